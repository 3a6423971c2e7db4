import Foundation
import UHLM

/// A run of reply text decided the same way, drawn in one colour.
struct Piece: Identifiable {
    let id: Int
    var text: String
    let source: TokenSource
}

enum Turn: Identifiable {
    case user(id: Int, text: String)
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
/// downloaded model, one `Uhlm` engine, the transcript and the counters. Runs on the main
/// actor; the engine's callbacks hop here before touching state.
@MainActor
final class ChatModel: ObservableObject {
    @Published private(set) var settings: DemoSettings
    @Published private(set) var phase: Phase = .idle
    @Published private(set) var turns: [Turn] = []
    @Published private(set) var stats: EngineStats?
    @Published private(set) var vocabSize: UInt32 = 0
    /// nil until the engine reported on the link.
    @Published private(set) var online: (Bool, String)?
    /// A readable sentence about what went wrong or was cancelled.
    @Published var notice: String?

    private let store: SettingsStore
    private var engine: Uhlm?
    private var engineSettings: DemoSettings?
    private var modelPath: String?
    private var task: Task<Void, Never>?
    private var nextId = 0
    /// A Cancel pressed during this generation. The engine's `cancel()` ends only generations
    /// it has registered, so a Cancel in the instant before `generate` reaches Rust is repeated
    /// at the first token rather than lost.
    private let cancelRequest = CancelRequest()

    init(store: SettingsStore) {
        self.store = store
        settings = store.load()
    }

    var busy: Bool { phase != .idle }

    func save(_ new: DemoSettings) {
        guard !busy else { return }
        store.save(new)
        settings = new
    }

    func send(_ prompt: String) {
        let prompt = prompt.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !busy, !prompt.isEmpty else { return }
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

    private func run(_ prompt: String) async {
        defer { phase = .idle }
        do {
            let model = try await ensureModel()
            let uhlm = try await loadEngine(model)
            // A Cancel pressed while the engine loaded cancelled this task, not a generation.
            try Task.checkCancellation()
            // Cleared before the phase says generating: a Cancel from then on is this one's.
            cancelRequest.set(false)
            phase = .generating
            let replyId = newId()
            append(.reply(id: replyId, pieces: [], summary: nil))
            let summary = try await generate(uhlm, prompt, into: replyId)
            finish(replyId, summary)
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
        let options = GenerationOptions(maxTokens: 160, chatTemplate: true)
        let request = cancelRequest
        let summary = try await uhlm.generate(prompt, options: options, onToken: { event in
            sink.yield(event)
            if request.isSet { uhlm.cancel() }
        }, onLinkChange: { up, detail in
            Task { @MainActor in self.online = (up, detail) }
        })
        sink.finish()
        await drain.value
        return summary
    }

    private func ensureModel() async throws -> String {
        if let modelPath { return modelPath }
        phase = .preparingModel(nil)
        let url = try await ModelDownload.prepare(from: settings.modelUrl) { p in
            Task { @MainActor in self.phase = .preparingModel(p) }
        }
        modelPath = url.path
        return url.path
    }

    private func loadEngine(_ model: String) async throws -> Uhlm {
        if let engine, engineSettings == settings { return engine }
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
            Task { @MainActor in self.phase = .loadingEngine(Double(p)) }
        }
        engine = uhlm
        engineSettings = s
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

    private func append(_ turn: Turn) { turns.append(turn) }

    private func newId() -> Int {
        nextId += 1
        return nextId
    }
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
