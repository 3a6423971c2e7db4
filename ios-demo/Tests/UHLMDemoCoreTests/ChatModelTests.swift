import Foundation
import UHLM
import XCTest

@testable import UHLMDemoCore

/// The iOS demo's chat model driven as its screens drive it, against an `EmbeddedServer` on
/// loopback with the default models (SmolLM2 and the draft derived from it): the cases of the
/// Kotlin desktop demo's tests (`DesktopDemoTest`), without the window.
///
/// Waits are for behaviour (a summary, a notice), with generous limits: nothing here measures
/// speed.
final class ChatModelTests: XCTestCase {
    static var models: DefaultModels!
    static var server: EmbeddedServer!

    /// Long enough for a slow, busy machine; a hang still fails.
    private static let wait: TimeInterval = 180

    override class func setUp() {
        super.setUp()
        models = try! ensureDefaultModels()
        server = try! EmbeddedServer.start(modelPath: models.llmPath, apiKey: nil)
    }

    override class func tearDown() {
        server.stop()
        super.tearDown()
    }

    func testAPromptStreamsAColouredReplyAndTheCountersMatchTheEngine() async throws {
        try await onMainActor { [self] in
            let chat = startApp(.uhlm, maxTokens: 24)
            chat.send("Name three fruits.")
            try await waitFor("the reply's summary or a notice", chat) { lastSummary($0) != nil || $0.notice != nil }
            XCTAssertNil(chat.notice)
            let summary = try XCTUnwrap(lastSummary(chat))
            XCTAssertFalse(summary.tokenIds.isEmpty, "the model answered")

            // The transcript: the prompt, then the reply exactly as the engine produced it.
            XCTAssertEqual(chat.turns.count, 2)
            guard case .user(_, let prompt) = chat.turns[0],
                  case .reply(_, let pieces, _) = chat.turns[1] else {
                return XCTFail("turns: \(chat.turns)")
            }
            XCTAssertEqual(prompt, "Name three fruits.")
            XCTAssertEqual(pieces.map(\.text).joined(), summary.text)
            // The colours follow the engine's own record of who decided each token.
            XCTAssertEqual(pieces.map(\.source), runs(summary.sources))

            // The counters, over the engine's only generation, are this summary's numbers.
            let stats = try XCTUnwrap(chat.stats)
            let s = summary.stats
            XCTAssertEqual(stats.generations, 1)
            XCTAssertEqual(stats.generatedTokens, UInt64(summary.tokenIds.count))
            XCTAssertEqual(stats.skipped, s.skipped)
            XCTAssertEqual(stats.uplinkBytes, s.uplinkBytes)
            XCTAssertEqual(s.drafted, s.skipped + s.sent + s.offline)
            XCTAssertEqual(s.offline, 0)
            // A uhlm generation of 24 tokens sends some; each has a round trip to show.
            XCTAssertGreaterThan(s.roundTrips, 0, "no token was sent")
            // SmolLM2's vocabulary: the dense baseline the "saved" counter compares against.
            XCTAssertEqual(chat.vocabSize, 49152)
            // The counters row, as the screen shows it.
            let counters = try XCTUnwrap(chat.counters)
            XCTAssertEqual(counters.tokens, "\(summary.tokenIds.count)")
            XCTAssertEqual(
                counters.onDevice, String(format: "%.1f %%", 100 * Double(s.skipped) / Double(s.decisions)))
            XCTAssertEqual(counters.uplink, "\(s.uplinkBytes) B")
            XCTAssertTrue(matches(counters.saved, #"(9\d\.\d|100\.0) %"#), "uplink saved vs dense f32: \(counters.saved)")
            XCTAssertTrue(matches(counters.tokensPerSecond, #"\d+\.\d"#), counters.tokensPerSecond)
            let rtt = try XCTUnwrap(counters.roundTrip)
            XCTAssertTrue(matches(rtt, #"\d+ ms"#), rtt)
            try await waitFor("the link report", chat) { $0.online != nil }
            XCTAssertEqual(chat.online?.0, true)
            XCTAssertFalse(chat.busy)
        }
    }

    func testCancelStopsAGenerationAndSaysSo() async throws {
        try await onMainActor { [self] in
            let chat = startApp(.hlm, maxTokens: 400)
            chat.send("Count from 1 to 300, separated by commas.")
            try await waitFor("a few tokens", chat) { !(lastReply($0)?.isEmpty ?? true) }
            chat.cancel()
            try await waitFor("the generation to end", chat) { !$0.busy && $0.notice != nil }
            XCTAssertEqual(chat.notice, "generation cancelled")
            // The tokens so far stay; the reply never finished.
            XCTAssertFalse(try XCTUnwrap(lastReply(chat)).isEmpty)
            XCTAssertNil(lastSummary(chat))
            let stats = try XCTUnwrap(chat.stats, "counters after a cancelled generation")
            XCTAssertLessThan(stats.generatedTokens, 400)
        }
    }

    func testACancelBeforeTheGenerationReachesTheEngineIsNotLost() async throws {
        try await onMainActor { [self] in
            // Cancel in the instant between the generating phase and the engine registering the
            // generation: the engine has nothing to cancel yet, so the model repeats it.
            let chat = startApp(.hlm, maxTokens: 400) { $0.cancel() }
            chat.send("Count from 1 to 300, separated by commas.")
            try await waitFor("the generation to end", chat) { !$0.busy && $0.notice != nil }
            XCTAssertEqual(chat.notice, "generation cancelled")
            XCTAssertNil(lastSummary(chat))
            XCTAssertLessThan(try XCTUnwrap(chat.stats).generatedTokens, 400)
        }
    }

    func testAWrongApiKeyTypedInSettingsIsAReadableNotice() async throws {
        try await onMainActor { [self] in
            let chat = startApp(.hlm, maxTokens: 8)
            var settings = chat.settings
            settings.apiKey = "not-the-key"
            chat.save(settings)
            XCTAssertEqual(chat.settings.apiKey, "not-the-key")
            chat.send("Hello")
            try await waitFor("a notice", chat) { !$0.busy && $0.notice != nil }
            let notice = try XCTUnwrap(chat.notice)
            XCTAssertTrue(notice.hasPrefix("the server rejected the API key"), notice)
            // Only the prompt remains: no empty reply, and the app is ready for the next message.
            XCTAssertEqual(chat.turns.count, 1)
            guard case .user(_, "Hello") = chat.turns[0] else { return XCTFail("turns: \(chat.turns)") }
        }
    }

    func testOnDeviceModeDecidesEveryTokenOnTheDevice() async throws {
        try await onMainActor { [self] in
            let chat = startApp(.uhlm, maxTokens: 8)
            var settings = chat.settings
            settings.mode = .slm
            chat.save(settings)
            chat.send("Hello")
            try await waitFor("the reply's summary or a notice", chat) { lastSummary($0) != nil || $0.notice != nil }
            XCTAssertNil(chat.notice)
            let summary = try XCTUnwrap(lastSummary(chat))
            XCTAssertTrue(summary.sources.allSatisfy { $0 == .local }, "\(summary.sources)")
            XCTAssertEqual(try XCTUnwrap(chat.stats).sent, 0)
        }
    }

    func testAModelAddressThatIsNotHttpsIsANotice() async throws {
        try await onMainActor { [self] in
            // The phone's own model source: nothing is downloaded from a blank address.
            let chat = ChatModel(store: InMemorySettingsStore(), models: DownloadedModel())
            chat.send("Hello")
            try await waitFor("a notice", chat) { !$0.busy && $0.notice != nil }
            XCTAssertEqual(chat.notice, "set the model's HTTPS download address in Settings")
            XCTAssertEqual(chat.turns.count, 1)
            XCTAssertNil(chat.stats)
        }
    }

    // MARK: helpers

    /// A chat on the loopback server, greedy, answering with at most `maxTokens`.
    @MainActor
    private func startApp(
        _ mode: Mode, maxTokens: UInt32, beforeGenerate: @escaping @MainActor (ChatModel) -> Void = { _ in }
    ) -> ChatModel {
        let server = Self.server!
        let settings = DemoSettings(
            server: server.address(), pin: server.certFingerprint(), apiKey: server.apiKey(), mode: mode)
        let options = GenerationOptions(temperature: 0, maxTokens: maxTokens, chatTemplate: true)
        var chat: ChatModel!
        chat = ChatModel(
            store: InMemorySettingsStore(settings), models: CachedDefaultModels(), options: options,
            beforeGenerate: { beforeGenerate(chat) })
        return chat
    }

    /// Polls `condition` on the main actor, where the model's state changes.
    @MainActor
    private func waitFor(_ what: String, _ chat: ChatModel, _ condition: (ChatModel) -> Bool) async throws {
        let deadline = Date().addingTimeInterval(Self.wait)
        while !condition(chat) {
            if Date() > deadline {
                XCTFail("waited \(Self.wait) s for \(what)")
                throw CancellationError()
            }
            try await Task.sleep(nanoseconds: 20_000_000)
        }
    }

    /// Runs `body` on the main actor, as the app's screens call the model.
    private func onMainActor(_ body: @MainActor () async throws -> Void) async throws {
        try await body()
    }

    @MainActor
    private func lastReply(_ chat: ChatModel) -> [Piece]? {
        guard case .reply(_, let pieces, _) = chat.turns.last else { return nil }
        return pieces
    }

    @MainActor
    private func lastSummary(_ chat: ChatModel) -> GenerationSummary? {
        guard case .reply(_, _, let summary) = chat.turns.last else { return nil }
        return summary
    }

    /// Whether the whole of `text` matches `pattern`.
    private func matches(_ text: String, _ pattern: String) -> Bool {
        text.range(of: "^(\(pattern))$", options: .regularExpression) != nil
    }

    /// `sources` with each run of equal neighbours collapsed: the pieces the reply is drawn in.
    private func runs(_ sources: [TokenSource]) -> [TokenSource] {
        sources.enumerated().filter { $0.offset == 0 || sources[$0.offset - 1] != $0.element }.map(\.element)
    }
}

/// The on-device draft from the model cache (derived there on first use), as the desktop
/// demo's tests get it.
private struct CachedDefaultModels: ModelSource {
    func prepare(_ settings: DemoSettings, onProgress: @escaping @Sendable (Double) -> Void) async throws -> String {
        try ensureDefaultModels().slmPath
    }
}
