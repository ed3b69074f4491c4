/// The parts of DNS (RFC 1035, 2782, 6891) the registry answers with, read and written by hand:
/// every read is bounds-checked, so no packet, however malformed, can trap or loop.
public enum DNSType: UInt16, Sendable {
    case a = 1, ns = 2, cname = 5, soa = 6, ptr = 12, mx = 15, txt = 16, aaaa = 28, srv = 33, opt = 41, any = 255
}

public enum DNSResponseCode: UInt8, Sendable {
    case noError = 0, formatError = 1, serverFailure = 2, nameError = 3, notImplemented = 4, refused = 5
}

public struct DNSQuestion: Sendable, Hashable {
    /// Lowercased, for matching.
    public var name: String
    public var type: UInt16
    public var qclass: UInt16
    /// The labels exactly as asked, echoed back byte for byte (resolvers that randomise case,
    /// such as Unbound's use-caps-for-id, drop answers that do not match).
    public var labels: [[UInt8]] = []
}

public struct DNSQuery: Sendable {
    public var id: UInt16
    public var flags: UInt16
    public var questions: [DNSQuestion]
    /// The requester's UDP payload size from an EDNS0 OPT record, if it sent one.
    public var ednsPayloadSize: Int?

    public var recursionDesired: Bool { flags & 0x0100 != 0 }
    public var isQuery: Bool { flags & 0x8000 == 0 }
    public var opcode: UInt8 { UInt8((flags >> 11) & 0xF) }
}

public enum DNSParseError: Error, Sendable {
    /// Not even a header: nothing to answer.
    case tooShort
    /// A header but a broken body: answer FORMERR with this id.
    case malformed(id: UInt16, flags: UInt16)
}

/// One resource record to write.
public struct DNSRecord: Sendable, Hashable {
    public enum Data: Sendable, Hashable {
        case a([UInt8])
        case srv(priority: UInt16, weight: UInt16, port: UInt16, target: String)
        case soa(primary: String, mailbox: String, serial: UInt32, refresh: UInt32, retry: UInt32, expire: UInt32, minimum: UInt32)
        case cname(String)
        case ptr(String)
    }

    public var name: String
    public var ttl: UInt32
    public var data: Data

    var type: UInt16 {
        switch data {
        case .a: return DNSType.a.rawValue
        case .srv: return DNSType.srv.rawValue
        case .soa: return DNSType.soa.rawValue
        case .cname: return DNSType.cname.rawValue
        case .ptr: return DNSType.ptr.rawValue
        }
    }
}

public enum DNSMessage {
    static let maximumPointerHops = 16

    public static func parse(_ bytes: [UInt8]) throws(DNSParseError) -> DNSQuery {
        guard bytes.count >= 12 else { throw .tooShort }
        let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
        let flags = UInt16(bytes[2]) << 8 | UInt16(bytes[3])
        let questionCount = Int(UInt16(bytes[4]) << 8 | UInt16(bytes[5]))
        let answerCount = Int(UInt16(bytes[6]) << 8 | UInt16(bytes[7]))
        let authorityCount = Int(UInt16(bytes[8]) << 8 | UInt16(bytes[9]))
        let additionalCount = Int(UInt16(bytes[10]) << 8 | UInt16(bytes[11]))
        var offset = 12
        var questions: [DNSQuestion] = []
        guard questionCount <= 8 else { throw .malformed(id: id, flags: flags) }
        for _ in 0..<questionCount {
            guard let labels = readLabels(bytes, at: &offset), offset + 4 <= bytes.count else { throw .malformed(id: id, flags: flags) }
            let type = UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
            let qclass = UInt16(bytes[offset + 2]) << 8 | UInt16(bytes[offset + 3])
            offset += 4
            let name = labels.map { String(decoding: $0, as: UTF8.self) }.joined(separator: ".").lowercased()
            questions.append(DNSQuestion(name: name, type: type, qclass: qclass, labels: labels))
        }
        // Skip answers and authorities; look for an OPT record among the additionals.
        var edns: Int?
        for section in 0..<3 {
            let count = [answerCount, authorityCount, additionalCount][section]
            guard count <= 64 else { break }
            for _ in 0..<count {
                guard readLabels(bytes, at: &offset) != nil, offset + 10 <= bytes.count else { return DNSQuery(id: id, flags: flags, questions: questions, ednsPayloadSize: edns) }
                let type = UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
                let rclass = Int(UInt16(bytes[offset + 2]) << 8 | UInt16(bytes[offset + 3]))
                let length = Int(UInt16(bytes[offset + 8]) << 8 | UInt16(bytes[offset + 9]))
                offset += 10 + length
                if section == 2 && type == DNSType.opt.rawValue { edns = max(512, min(rclass, 65_535)) }
            }
        }
        return DNSQuery(id: id, flags: flags, questions: questions, ednsPayloadSize: edns)
    }

    /// Reads a possibly compressed name as raw labels; nil when it runs off the end, loops, or is too long.
    static func readLabels(_ bytes: [UInt8], at offset: inout Int) -> [[UInt8]]? {
        var labels: [[UInt8]] = []
        var position = offset
        var jumped = false
        var hops = 0
        var length = 0
        while true {
            guard position < bytes.count else { return nil }
            let size = Int(bytes[position])
            if size == 0 {
                position += 1
                break
            }
            if size & 0xC0 == 0xC0 {
                guard position + 1 < bytes.count else { return nil }
                hops += 1
                guard hops <= maximumPointerHops else { return nil }
                let target = (size & 0x3F) << 8 | Int(bytes[position + 1])
                if !jumped { offset = position + 2 }
                jumped = true
                guard target < bytes.count else { return nil }
                position = target
                continue
            }
            guard size & 0xC0 == 0, position + 1 + size <= bytes.count else { return nil }
            length += size + 1
            guard length <= 255 else { return nil }
            labels.append(Array(bytes[(position + 1)..<(position + 1 + size)]))
            position += 1 + size
        }
        if !jumped { offset = position }
        return labels
    }

    /// Builds a response: the question echoed, then answers and additionals until `limit` bytes;
    /// what does not fit sets the TC bit (the client asks again over TCP).
    public static func response(
        to query: DNSQuery, code: DNSResponseCode, answers: [DNSRecord], authority: [DNSRecord] = [], additional: [DNSRecord] = [],
        authoritative: Bool = true, limit: Int = 65_535
    ) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        func u16(_ value: UInt16) { out.append(UInt8(value >> 8)); out.append(UInt8(value & 0xFF)) }
        func u32(_ value: UInt32) { u16(UInt16(value >> 16)); u16(UInt16(value & 0xFFFF)) }
        let asked = query.questions.first
        func name(_ text: String) {
            // The question's own name goes back exactly as it came.
            if let asked, !asked.labels.isEmpty, text == asked.name {
                for label in asked.labels {
                    out.append(UInt8(label.count))
                    out.append(contentsOf: label)
                }
                out.append(0)
                return
            }
            for label in text.split(separator: ".") {
                let bytes = Array(label.utf8.prefix(63))
                out.append(UInt8(bytes.count))
                out.append(contentsOf: bytes)
            }
            out.append(0)
        }
        func record(_ record: DNSRecord) {
            name(record.name)
            u16(record.type)
            u16(1)
            u32(record.ttl)
            let lengthAt = out.count
            u16(0)
            switch record.data {
            case .a(let address): out.append(contentsOf: address)
            case .srv(let priority, let weight, let port, let target):
                u16(priority); u16(weight); u16(port); name(target)
            case .soa(let primary, let mailbox, let serial, let refresh, let retry, let expire, let minimum):
                name(primary); name(mailbox); u32(serial); u32(refresh); u32(retry); u32(expire); u32(minimum)
            case .cname(let target), .ptr(let target): name(target)
            }
            let length = out.count - lengthAt - 2
            out[lengthAt] = UInt8(length >> 8)
            out[lengthAt + 1] = UInt8(length & 0xFF)
        }
        u16(query.id)
        var flags: UInt16 = 0x8000 | (query.flags & 0x7800) | (query.flags & 0x0100) | UInt16(code.rawValue)
        if authoritative { flags |= 0x0400 }
        u16(flags)
        let questions = Array(query.questions.prefix(1))
        u16(UInt16(questions.count))
        let countsAt = out.count
        u16(0); u16(0); u16(0)
        for question in questions {
            name(question.name)
            u16(question.type)
            u16(question.qclass)
        }
        var written = [0, 0, 0]
        var truncated = false
        for (section, records) in [answers, authority, additional].enumerated() {
            for item in records {
                let mark = out.count
                record(item)
                if out.count > limit {
                    out.removeSubrange(mark...)
                    // Missing additionals are fine; missing answers are not: tell the client.
                    if section == 0 { truncated = true }
                    break
                }
                written[section] += 1
            }
            if truncated { break }
        }
        out[countsAt] = UInt8(written[0] >> 8); out[countsAt + 1] = UInt8(written[0] & 0xFF)
        out[countsAt + 2] = UInt8(written[1] >> 8); out[countsAt + 3] = UInt8(written[1] & 0xFF)
        out[countsAt + 4] = UInt8(written[2] >> 8); out[countsAt + 5] = UInt8(written[2] & 0xFF)
        if truncated { out[2] |= 0x02 }
        return out
    }

    /// FORMERR or another bare code for a query that could not be read.
    public static func error(id: UInt16, flags: UInt16, code: DNSResponseCode) -> [UInt8] {
        let responseFlags: UInt16 = 0x8000 | (flags & 0x7900) | UInt16(code.rawValue)
        return [UInt8(id >> 8), UInt8(id & 0xFF), UInt8(responseFlags >> 8), UInt8(responseFlags & 0xFF), 0, 0, 0, 0, 0, 0, 0, 0]
    }
}
