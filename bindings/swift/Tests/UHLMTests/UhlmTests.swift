import XCTest
@testable import UHLM

/// The whole hybrid loop on macOS (or an iOS simulator): an `EmbeddedServer` with the default
/// LLM and an engine with the default derived draft. Needs the default models in the cache
/// (`uhlm fetch smollm2`, or `UHLM_MODELS` pointing at a directory holding them).
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
        let uhlm = try await Uhlm.load(config(.hlm))
        let events = Events()
        let summary = try await uhlm.generate("The capital of France is", options: greedy) { events.append($0) }
        let seen = events.all

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
        } catch UhlmError.Cancelled {
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
        } catch UhlmError.Unauthorized {
            // expected
        }
    }
}

/// Token events collected from the engine's thread.
private final class Events: @unchecked Sendable {
    private let lock = NSLock()
    private var events: [TokenEvent] = []

    /// Appends and returns the new count.
    @discardableResult
    func append(_ event: TokenEvent) -> Int {
        lock.lock()
        defer { lock.unlock() }
        events.append(event)
        return events.count
    }

    var all: [TokenEvent] {
        lock.lock()
        defer { lock.unlock() }
        return events
    }
}
