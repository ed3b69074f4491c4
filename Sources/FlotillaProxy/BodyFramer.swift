/// Finds where an HTTP/1.x message body ends, without changing a byte of it: the proxy relays
/// bodies as they arrive (chunked framing included) and only needs to know which bytes belong to
/// this message and which to the next. Chunked framing is read strictly — every line ends in
/// CRLF — because the bytes go on as they are: a next hop that reads a bare LF differently
/// must not be able to find another message in them.
struct BodyFramer {
    enum Framing: Equatable {
        case length(Int64)
        case chunked
        /// A response without length or chunking: it ends when the upstream closes.
        case untilClose
    }

    private enum Chunk {
        case size(value: Int64, digits: Int)
        case sizeSpace(value: Int64)
        case sizeExtension(value: Int64)
        case sizeLF(value: Int64)
        case data(remaining: Int64)
        case dataCR
        case dataLF
        case trailerLineStart
        case trailerLine
        case trailerEndLF
        case trailerLineLF
    }

    let framing: Framing
    private var remaining: Int64 = 0
    private var chunk: Chunk = .size(value: 0, digits: 0)
    private var metadataBytes = 0
    private(set) var isComplete = false

    /// Bound on chunk-size lines, extensions and trailers together, per chunk.
    static let metadataLimit = 16 * 1024

    init(_ framing: Framing) {
        self.framing = framing
        switch framing {
        case .length(let length):
            remaining = length
            isComplete = length == 0
        case .chunked, .untilClose:
            break
        }
    }

    /// How many of `bytes` (from the start) belong to the body; sets `isComplete` when its end is among them.
    mutating func consume(_ bytes: UnsafeRawBufferPointer) throws(HTTP1Error) -> Int {
        guard !isComplete else { return 0 }
        switch framing {
        case .length:
            let taken = Int(min(Int64(bytes.count), remaining))
            remaining -= Int64(taken)
            if remaining == 0 { isComplete = true }
            return taken
        case .untilClose:
            return bytes.count
        case .chunked:
            return try consumeChunked(bytes)
        }
    }

    private mutating func consumeChunked(_ bytes: UnsafeRawBufferPointer) throws(HTTP1Error) -> Int {
        var index = 0
        let count = bytes.count
        while index < count {
            if case .data(let left) = chunk {
                let taken = Int(min(Int64(count - index), left))
                index += taken
                chunk = left == Int64(taken) ? .dataCR : .data(remaining: left - Int64(taken))
                continue
            }
            let byte = bytes[index]
            index += 1
            metadataBytes += 1
            if metadataBytes > Self.metadataLimit { throw .bad("chunk size line or trailer too long") }
            switch chunk {
            case .size(let value, let digits):
                if let digit = Self.hexValue(byte) {
                    guard digits < 15 else { throw .bad("chunk size too large") }
                    chunk = .size(value: value << 4 | Int64(digit), digits: digits + 1)
                } else if digits > 0, byte == 0x3B {
                    chunk = .sizeExtension(value: value)
                } else if digits > 0, byte == 0x20 || byte == 0x09 {
                    chunk = .sizeSpace(value: value)
                } else if digits > 0, byte == 0x0D {
                    chunk = .sizeLF(value: value)
                } else {
                    throw .bad("malformed chunk size")
                }
            case .sizeSpace(let value):
                switch byte {
                case 0x20, 0x09: break
                case 0x3B: chunk = .sizeExtension(value: value)
                case 0x0D: chunk = .sizeLF(value: value)
                default: throw .bad("malformed chunk size")
                }
            case .sizeExtension(let value):
                if byte == 0x0D {
                    chunk = .sizeLF(value: value)
                } else if byte < 0x20 && byte != 0x09 || byte == 0x7F {
                    throw .bad("control character in a chunk extension")
                }
            case .sizeLF(let value):
                guard byte == 0x0A else { throw .bad("chunk size line not terminated") }
                endOfSizeLine(value)
            case .data:
                break  // handled above
            case .dataCR:
                guard byte == 0x0D else { throw .bad("chunk data longer than its size") }
                chunk = .dataLF
            case .dataLF:
                guard byte == 0x0A else { throw .bad("chunk data not terminated") }
                nextChunk()
            case .trailerLineStart:
                if byte == 0x0D {
                    chunk = .trailerEndLF
                } else if byte == 0x0A {
                    throw .bad("bare LF in a chunked body")
                } else {
                    chunk = .trailerLine
                }
            case .trailerLine:
                if byte == 0x0D {
                    chunk = .trailerLineLF
                } else if byte == 0x0A || byte < 0x20 && byte != 0x09 || byte == 0x7F {
                    throw .bad("bare LF or control character in a trailer")
                }
            case .trailerLineLF:
                guard byte == 0x0A else { throw .bad("bare CR in a trailer") }
                chunk = .trailerLineStart
            case .trailerEndLF:
                guard byte == 0x0A else { throw .bad("chunked body not terminated") }
                isComplete = true
                return index
            }
        }
        return index
    }

    private mutating func endOfSizeLine(_ value: Int64) {
        chunk = value == 0 ? .trailerLineStart : .data(remaining: value)
    }

    private mutating func nextChunk() {
        chunk = .size(value: 0, digits: 0)
        metadataBytes = 0
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case 0x30...0x39: byte - 0x30
        case 0x41...0x46: byte - 0x41 + 10
        case 0x61...0x66: byte - 0x61 + 10
        default: nil
        }
    }
}
