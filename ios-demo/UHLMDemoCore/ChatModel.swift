import Foundation
import UHLM

#if canImport(Combine)
import Combine
#endif

/// A run of reply text decided the same way, drawn in one colour.
struct Piece: Identifiable, Equatable {
    let id: Int
    var text: String
    let source: TokenSource
}

enum Turn: Identifiable {
    case user(id: Int, text: String)
    /// The model's answer as it streams in; `summary` arrives when the generation finished, an
    /// interrupted reply keeps the tokens it had and has none.
    case reply(id: Int, pieces: [Piece], summary: GenerationSummary?)

    var id: Int {
        switch self {
        case .user(let id, _), .reply(let id, _, _): return id
        }
    }
}

enum Phase: Equatable {
    case idle
    case preparingModel(Double?)
    case loadingEngine(Double)
    case generating
}

/// The demo's state and actions, the Swift twin of the Kotlin `ChatViewModel`: settings, the
/// on-device model, one `Uhlm` engine, the transcript and the counters. Runs on the main
/// actor; the engine's callbacks hop here before touching state.
///
/// SwiftUI observes it through `ObservableObject` where Combine exists (Apple platforms); each
/// property announces its change itself (`willChange`) instead of through `@Published`, so the
/// same class builds, and is tested, on Linux, where there is no Combine.
@MainActor
final class ChatModel {
    private(set) var settings: DemoSettings { willSet { willChange() } }
    private(set) var phase: Phase = .idle { willSet { willChange() } }
    private(set) var turns: [Turn] = [] { willSet { willChange() } }
    private(set) var stats: EngineStats? { willSet { willChange() } }
    private(set) var vocabSize: UInt32 = 0 { willSet { willChange() } }
    /// nil until the engine reported on the link.
    private(set) var online: (Bool, String)? { willSet { willChange() } }
    /// A readable sentence about what went wrong or was cancelled.
    var notice: String? { willSet { willChange() } }

    #if canImport(Combine)
    /// Stored, not the protocol's default: that default finds its publisher through
    /// `@Published` properties, and without any it hands out a new one on every read.
    let objectWillChange = ObservableObjectPublisher()
    #endif

    private let store: SettingsStore
    private let models: ModelSource
    private let options: GenerationOptions
    /// For tests: runs once the phase is `.generating`, just before the engine is asked, the
    /// instant a Cancel used to be lost in (`cancelRequest`).
    private let beforeGenerate: @MainActor () -> Void
    private var engine: Uhlm?
    private var engineKey: EngineKey?
    private var modelPath: String?
    private var task: Task<Void, Never>?
    private var nextId = 0
    /// A Cancel pressed during this generation. The engine's `cancel()` ends only generations
    /// it has registered, so a Cancel in the instant before `generate` reaches Rust is repeated
    /// at the first token rather than lost.
    private let cancelRequest = CancelRequest()

    init(
        store: SettingsStore,
        models: ModelSource,
        options: GenerationOptions = GenerationOptions(maxTokens: 160, chatTemplate: true),
        beforeGenerate: @escaping @MainActor () -> Void = {}
    ) {
        self.store = store
        self.models = models
        self.options = options
        self.beforeGenerate = beforeGenerate
        settings = store.load()
    }

    var busy: Bool { phase != .idle }

    /// The counters row; nil until the engine has stats.
    var counters: Counters? { stats.map { Counters($0, vocabSize: vocabSize) } }

    func save(_ new: DemoSettings) {
        guard !busy else { return }
        store.save(new)
        settings = new
    }

    func send(_ prompt: String) {
        let prompt = prompt.trimmingCharacters(in: .whitespacesAndNewlines)
        // `task`: a second Send before the first one's task has set the phase is refused.
        guard !busy, task == nil, !prompt.isEmpty else { return }
        notice = nil
        append(.user(id: newId(), text: prompt))
        task = Task { await run(prompt) }
    }

    /// A generation ends with the engine's "generation cancelled" (see `cancelRequest`); a
    /// download is abandoned.
    func cancel() {
        if phase == .generating {
            cancelRequest.set(true)
            engine?.cancel()
        } else {
            task?.cancel()
        }
    }

    /// Tells the engine the device switched networks (from an `NWPathMonitor` update).
    func networkChanged() {
        engine?.networkChanged()
    }

    private func run(_ prompt: String) async {
        defer {
            phase = .idle
            task = nil
        }
        var replyId: Int?
        do {
            let model = try await ensureModel()
            let uhlm = try await loadEngine(model)
            // A Cancel pressed while the engine loaded cancelled this task, not a generation.
            try Task.checkCancellation()
            // Cleared before the phase says generating: a Cancel from then on is this one's.
            cancelRequest.set(false)
            phase = .generating
            let id = newId()
            replyId = id
            append(.reply(id: id, pieces: [], summary: nil))
            beforeGenerate()
            let summary = try await generate(uhlm, prompt, into: id)
            finish(id, summary)
        } catch is CancellationError {
            if case .loadingEngine = phase {
                notice = "Loading the model was cancelled."
            } else {
                notice = "Model download cancelled."
            }
        } catch let error as URLError where error.code == .cancelled {
            notice = "Model download cancelled."
        } catch let error as UhlmError {
            notice = describeError(error: error)
        } catch {
            notice = error.localizedDescription
        }
        // A reply that never got a token is not shown (the Kotlin app does the same).
        if let replyId, isEmpty(reply: replyId) {
            turns.removeAll { $0.id == replyId }
        }
        if let uhlm = engine { stats = uhlm.stats() }
    }

    /// Streams the tokens into the reply in order: the engine's thread yields them into an
    /// `AsyncStream` that one main-actor loop drains (separate `Task`s could reorder them).
    private func generate(_ uhlm: Uhlm, _ prompt: String, into replyId: Int) async throws -> GenerationSummary {
        var continuation: AsyncStream<TokenEvent>.Continuation!
        let events = AsyncStream<TokenEvent> { continuation = $0 }
        let sink = continuation!
        let drain = Task { @MainActor in
            for await event in events { self.add(event, to: replyId) }
        }
        defer { sink.finish() }
        let ticker = Task { @MainActor in
            // The counters move while tokens stream, not only at the end.
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: 250_000_000)
                self.stats = uhlm.stats()
            }
        }
        defer { ticker.cancel() }
        let request = cancelRequest
        do {
            let summary = try await uhlm.generate(prompt, options: options, onToken: { event in
                sink.yield(event)
                if request.isSet { uhlm.cancel() }
            }, onLinkChange: { up, detail in
                Task { @MainActor in self.online = (up, detail) }
            })
            sink.finish()
            await drain.value
            return summary
        } catch {
            // The tokens that arrived before the error stay in the reply.
            sink.finish()
            await drain.value
            throw error
        }
    }

    private func ensureModel() async throws -> String {
        if let modelPath { return modelPath }
        phase = .preparingModel(nil)
        let path = try await models.prepare(settings) { p in
            Task { @MainActor in self.phase = .preparingModel(p) }
        }
        modelPath = path
        return path
    }

    private func loadEngine(_ model: String) async throws -> Uhlm {
        let key = EngineKey(settings: settings, model: model)
        if let engine, engineKey == key { return engine }
        engine = nil
        phase = .loadingEngine(0)
        let s = settings
        let config = EngineConfig(
            slmPath: model,
            server: s.server.isEmpty ? nil : s.server,
            pin: s.pin.isEmpty ? nil : s.pin.lowercased(),
            apiKey: s.apiKey,
            mode: s.mode)
        let uhlm = try await Uhlm.load(config) { p in
            Task { @MainActor in
                // A late report must not move the phase back once loading ended.
                if case .loadingEngine = self.phase { self.phase = .loadingEngine(Double(p)) }
            }
        }
        engine = uhlm
        engineKey = key
        vocabSize = uhlm.vocabSize()
        stats = nil
        online = nil
        return uhlm
    }

    private func add(_ event: TokenEvent, to replyId: Int) {
        guard let i = turns.firstIndex(where: { $0.id == replyId }),
              case .reply(let id, var pieces, let summary) = turns[i] else { return }
        if let last = pieces.last, last.source == event.source {
            pieces[pieces.count - 1].text += event.text
        } else {
            pieces.append(Piece(id: pieces.count, text: event.text, source: event.source))
        }
        turns[i] = .reply(id: id, pieces: pieces, summary: summary)
    }

    private func finish(_ replyId: Int, _ summary: GenerationSummary) {
        guard let i = turns.firstIndex(where: { $0.id == replyId }),
              case .reply(let id, let pieces, _) = turns[i] else { return }
        turns[i] = .reply(id: id, pieces: pieces, summary: summary)
    }

    /// Whether the reply has neither a token nor a summary.
    private func isEmpty(reply replyId: Int) -> Bool {
        guard let turn = turns.first(where: { $0.id == replyId }),
              case .reply(_, let pieces, let summary) = turn else { return false }
        return pieces.isEmpty && summary == nil
    }

    private func append(_ turn: Turn) { turns.append(turn) }

    private func newId() -> Int {
        nextId += 1
        return nextId
    }

    /// What `@Published` would do: tell SwiftUI before a property changes.
    private func willChange() {
        #if canImport(Combine)
        objectWillChange.send()
        #endif
    }
}

#if canImport(Combine)
extension ChatModel: ObservableObject {}
#endif

/// The settings and model an engine was loaded with: it is reloaded when they change.
private struct EngineKey: Equatable {
    let settings: DemoSettings
    let model: String
}

/// A flag set on the main actor and read on the engine's thread.
private final class CancelRequest: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }

    func set(_ newValue: Bool) {
        lock.lock()
        value = newValue
        lock.unlock()
    }
}
