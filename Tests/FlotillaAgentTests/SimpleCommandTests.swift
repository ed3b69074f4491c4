import Testing
@testable import FlotillaAgent

/// A `cmd` runs without a shell only when the shell would do nothing but split it into words.
@Suite struct SimpleCommandTests {
    let path = "/usr/bin:/bin"

    @Test func plainWordsRunDirectly() {
        #expect(SimpleCommand.words(of: "exec sleep 3600", searchPath: path) == ["sleep", "3600"])
        #expect(SimpleCommand.words(of: "sleep  3600", searchPath: path) == ["sleep", "3600"])
        #expect(SimpleCommand.words(of: "/bin/sleep --version=1 a,b:c@d%e+f", searchPath: path) == ["/bin/sleep", "--version=1", "a,b:c@d%e+f"])
    }

    @Test func anythingTheShellInterpretsGoesThroughIt() {
        for command in [
            "sleep $SECONDS", "sleep 1; sleep 2", "sleep 1 && true", "sleep 1 | cat", "sleep 1 > out", "sleep \"1\"", "sleep '1'",
            "sleep *", "sleep ~", "FOO=bar sleep 1", "cd /tmp", "echo hi", "exec", "", "./server", "bin/server --port 1",
            "no-such-program-here 1", "sleep `date`", "sleep 1 &", "sleep 1\nsleep 2", "sleep \\1", "kill 1", "if true",
        ] {
            #expect(SimpleCommand.words(of: command, searchPath: path) == nil, "\(command) should need a shell")
        }
    }
}
