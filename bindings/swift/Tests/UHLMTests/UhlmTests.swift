import XCTest
@testable import UHLM

/// The whole hybrid loop, the Kotlin and Python suites' cases: an `EmbeddedServer` with the
/// default LLM and an engine with the default derived draft. Runs on Linux under
/// `cargo xtask test-swift` (and on macOS or an iOS simulator with the XCFramework). Needs the
/// default models in the cache (`uhlm fetch smollm2`, or `UHLM_MODELS` pointing at a directory
/// holding them).
final class UhlmTests: XCTestCase {
    static var models: DefaultModels!
    static var server: EmbeddedServer!

    override class func setUp() {
        super.setUp()
        models = try! ensureDefaultModels()
        server = try! EmbeddedServer.start(modelPath: models.llmPath, apiKey: nil)
    }

    override class func tearDown() {
        server.stop()
        super.tearDown()
    }

    private func config(_ mode: Mode, apiKey: String? = nil) -> EngineConfig {
        let server = Self.server!
        return EngineConfig(
            slmPath: Self.models.slmPath,
            server: server.address(),
            pin: server.certFingerprint(),
            apiKey: apiKey ?? server.apiKey(),
            mode: mode
        )
    }

    private let greedy = GenerationOptions(temperature: 0, maxTokens: 16)
    private let long = GenerationOptions(temperature: 0, maxTokens: 200)

    func testHybridGenerationStreamsTokensInOrderAndCountsAddUp() async throws {
        let progress = Floats()
        let uhlm = try await Uhlm.load(config(.hlm)) { progress.append($0) }
        let reports = progress.all
        XCTAssertGreaterThan(reports.count, 2, "progress reports: \(reports)")
        XCTAssertEqual(reports.sorted(), reports)
        XCTAssertEqual(reports.last, 1)
        let events = Events()
        let links = Links()
        let summary = try await uhlm.generate(
            "The capital of France is", options: greedy,
            onToken: { events.append($0) },
            onLinkChange: { online, _ in links.append(online) })
        let seen = events.all

        // The session opened once and never dropped on loopback.
        XCTAssertEqual(links.all, [true])
        // SmolLM2's vocabulary, which the derived draft keeps.
        XCTAssertEqual(uhlm.vocabSize(), 49152)
        XCTAssertFalse(summary.tokenIds.isEmpty)
        XCTAssertEqual(seen.map(\.position), (0..<UInt32(summary.tokenIds.count)).map { $0 })
        XCTAssertEqual(seen.map(\.tokenId), summary.tokenIds)
        XCTAssertEqual(seen.map(\.source), summary.sources)
        // HLM sends every draft: each token was decided by the server.
        XCTAssertTrue(summary.sources.allSatisfy { $0 == .accepted || $0 == .resampled })
        let s = summary.stats
        XCTAssertEqual(s.sent, s.accepted + s.resampled)
        XCTAssertEqual(s.drafted, s.skipped + s.sent + s.offline)
        XCTAssertEqual(s.offline, 0)
        XCTAssertEqual(s.generatedTokens, UInt64(summary.tokenIds.count))
        XCTAssertGreaterThanOrEqual(s.decisions, s.generatedTokens)
        XCTAssertTrue(summary.text.hasPrefix(seen.map(\.text).joined()))
        XCTAssertEqual(uhlm.stats().generations, 1)
    }

    func testStreamYieldsTheSameTokensAsGenerate() async throws {
        let uhlm = try await Uhlm.load(config(.uhlm))
        let summary = try await uhlm.generate("Once upon a time", options: greedy)
        var streamed: [TokenEvent] = []
        for try await event in uhlm.stream("Once upon a time", options: greedy) {
            streamed.append(event)
        }
        XCTAssertEqual(streamed.map(\.tokenId), summary.tokenIds)
        XCTAssertTrue(streamed.allSatisfy { $0.source != .offline })
    }

    func testLeavingTheStreamStopsTheGeneration() async throws {
        let uhlm = try await Uhlm.load(config(.hlm))
        var first: [TokenEvent] = []
        for try await event in uhlm.stream("Once upon a time, in a land far away,", options: long) {
            first.append(event)
            if first.count == 3 { break }
        }
        XCTAssertEqual(first.map(\.position), [0, 1, 2])
        // One generation at a time: this completes only if the abandoned one ended.
        let next = try await uhlm.generate("Hello", options: GenerationOptions(temperature: 0, maxTokens: 2))
        XCTAssertLessThanOrEqual(next.tokenIds.count, 2)
        XCTAssertLessThan(uhlm.stats().generatedTokens, 200)
    }

    func testCancelEndsAGenerationWithCancelled() async throws {
        let uhlm = try await Uhlm.load(config(.hlm))
        let events = Events()
        do {
            _ = try await uhlm.generate("Once upon a time, in a land far away,", options: long) { event in
                if events.append(event) == 2 { uhlm.cancel() }
            }
            XCTFail("the generation was not cancelled")
        } catch let error as UhlmError {
            guard case .Cancelled = error else { return XCTFail("expected Cancelled, got \(error)") }
            XCTAssertEqual(String(describing: error), "generation cancelled")
            let count = events.all.count
            XCTAssertTrue((2..<200).contains(count), "\(count) tokens")
        }
    }

    func testMissingModelFileIsModelNotFound() {
        XCTAssertThrowsError(
            try HybridEngine(config: EngineConfig(slmPath: "/nonexistent/uhlm-draft.gguf", mode: .slm))
        ) { error in
            guard case let UhlmError.ModelNotFound(path) = error else {
                return XCTFail("expected ModelNotFound, got \(error)")
            }
            XCTAssertTrue(path.contains("uhlm-draft.gguf"))
            XCTAssertEqual(
                String(describing: error), "on-device model not found: /nonexistent/uhlm-draft.gguf")
        }
    }

    func testWrongApiKeyIsUnauthorized() async throws {
        let uhlm = try await Uhlm.load(config(.hlm, apiKey: "not-the-key"))
        do {
            _ = try await uhlm.generate("Hello", options: greedy)
            XCTFail("a wrong key was accepted")
        } catch let error as UhlmError {
            guard case .Unauthorized = error else { return XCTFail("expected Unauthorized, got \(error)") }
            let sentence = String(describing: error)
            XCTAssertTrue(sentence.hasPrefix("the server rejected the API key"), sentence)
        }
    }

    func testAnotherCertificateThanThePinnedOneIsCertificateMismatch() async throws {
        let pin = String(repeating: "ab", count: 32)
        var pinned = config(.hlm)
        pinned.pin = pin
        do {
            let uhlm = try await Uhlm.load(pinned)
            _ = try await uhlm.generate("Hello", options: greedy)
            XCTFail("a server with another certificate was trusted")
        } catch let error as UhlmError {
            guard case let .CertificateMismatch(expected, actual) = error else {
                return XCTFail("expected CertificateMismatch, got \(error)")
            }
            XCTAssertEqual(expected, pin)
            XCTAssertEqual(actual, Self.server.certFingerprint())
            XCTAssertEqual(
                String(describing: error),
                "the server's certificate does not match the pinned fingerprint: expected \(pin), got \(actual); check --pin against the fingerprint the server printed")
        }
    }

    func testAFileThatIsNoModelIsCorruptModel() throws {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("uhlm-not-a-model-\(UUID().uuidString).gguf").path
        try Data("not a GGUF file".utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        XCTAssertThrowsError(try HybridEngine(config: EngineConfig(slmPath: path, mode: .slm))) { error in
            guard case let UhlmError.CorruptModel(reported, reason) = error else {
                return XCTFail("expected CorruptModel, got \(error)")
            }
            XCTAssertEqual(reported, path)
            XCTAssertEqual(String(describing: error), "on-device model \(path) is unusable: \(reason)")
        }
    }

    func testAnEmptyPromptIsInvalidConfig() async throws {
        let uhlm = try await Uhlm.load(EngineConfig(slmPath: Self.models.slmPath, mode: .slm))
        do {
            _ = try await uhlm.generate("", options: greedy)
            XCTFail("an empty prompt was accepted")
        } catch let error as UhlmError {
            XCTAssertEqual(error, .InvalidConfig(reason: "the prompt is empty"))
            XCTAssertEqual(String(describing: error), "invalid configuration: the prompt is empty")
        }
    }

    /// Every case, lowered into Rust and its `Display` text lifted back: the sentence the CLI
    /// prints, through `description`, `describeError` and `localizedDescription` alike.
    func testEveryErrorSaysItsSentence() {
        let cases: [UhlmError] = [
            .ModelNotFound(path: "/m.gguf"),
            .CorruptModel(path: "/m", reason: "truncated"),
            .InvalidConfig(reason: "x"),
            .Unauthorized(reason: "bad key"),
            .CertificateMismatch(expected: "aa", actual: "bb"),
            .Tls(reason: "alpn"),
            .VocabularyMismatch(reason: "fp"),
            .UnsupportedVersion(reason: "2"),
            .ServerUnreachable(addr: "a:1", reason: "timeout"),
            .Protocol(reason: "p"),
            .Cancelled,
            .Model(reason: "m"),
            .Server(reason: "s"),
            .Unsupported(reason: "u"),
        ]
        for error in cases {
            let expected = Self.sentence(error)
            XCTAssertEqual(error.description, expected)
            XCTAssertEqual(describeError(error: error), expected)
            XCTAssertEqual(String(describing: error), expected)
            XCTAssertEqual(error.localizedDescription, expected)
        }
    }

    /// The Rust `#[error]` text of each case (rust/ffi/src/error.rs); exhaustive, so a new case
    /// does not compile until it is here.
    private static func sentence(_ error: UhlmError) -> String {
        switch error {
        case let .ModelNotFound(path): return "on-device model not found: \(path)"
        case let .CorruptModel(path, reason): return "on-device model \(path) is unusable: \(reason)"
        case let .InvalidConfig(reason): return "invalid configuration: \(reason)"
        case let .Unauthorized(reason): return "the server rejected the API key: \(reason)"
        case let .CertificateMismatch(expected, actual):
            return "the server's certificate does not match the pinned fingerprint: expected \(expected), got \(actual); check --pin against the fingerprint the server printed"
        case let .Tls(reason): return "TLS handshake with the server failed: \(reason)"
        case let .VocabularyMismatch(reason):
            return "the on-device model's vocabulary does not match the server's model (\(reason)); use a draft model derived from the server's model"
        case let .UnsupportedVersion(reason): return "the server speaks another protocol version: \(reason)"
        case let .ServerUnreachable(addr, reason): return "cannot reach the server at \(addr): \(reason)"
        case let .Protocol(reason): return "protocol error: \(reason)"
        case .Cancelled: return "generation cancelled"
        case let .Model(reason): return "on-device model failed: \(reason)"
        case let .Server(reason): return "the embedded server failed: \(reason)"
        case let .Unsupported(reason): return "not in this build of uhlm: \(reason)"
        }
    }
}

/// Values collected from the engine's threads.
private final class Collected<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Value] = []

    /// Appends and returns the new count.
    @discardableResult
    func append(_ value: Value) -> Int {
        lock.lock()
        defer { lock.unlock() }
        values.append(value)
        return values.count
    }

    var all: [Value] {
        lock.lock()
        defer { lock.unlock() }
        return values
    }
}

private typealias Events = Collected<TokenEvent>
private typealias Links = Collected<Bool>
private typealias Floats = Collected<Float>
