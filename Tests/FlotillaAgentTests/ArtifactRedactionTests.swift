@testable import FlotillaAgent
import Testing

@Suite struct ArtifactRedactionTests {
    @Test func passwordsInArtifactURIsNeverReachTheLog() {
        #expect(ArtifactRequest.redacted("https://deploy:s3cret@repo.example/app.tgz") == "https://deploy:***@repo.example/app.tgz")
        #expect(!ArtifactRequest.redacted("http://u:p%40ss@127.0.0.1:8080/x").contains("p%40ss"))
        #expect(ArtifactRequest.redacted("https://repo.example/app.tgz") == "https://repo.example/app.tgz")
        #expect(ArtifactRequest.redacted("/srv/artifacts/app.tgz") == "/srv/artifacts/app.tgz")
    }
}
