import Foundation

/// The uhlm engine for Swift apps: an actor over the generated `HybridEngine`.
///
/// Load it with `Uhlm.load(_:)` (the model loads off the caller's executor), then call
/// `generate(_:options:onToken:)` or iterate `stream(_:options:)`. Cancelling the awaiting task,
/// or ending the stream's iteration, cancels the generation in Rust.
public actor Uhlm {
    private let engine: HybridEngine

    /// Loads the on-device model synchronously; prefer `load(_:)` from async code.
    /// `onProgress` gets the fraction of the weights read (0 to 1), on the loading thread.
    public init(config: EngineConfig, onProgress: (@Sendable (Float) -> Void)? = nil) throws {
        engine = try HybridEngine.withProgress(
            config: config, progress: onProgress.map(ProgressForwarder.init))
    }

    /// Loads the on-device model on a background thread.
    public static func load(
        _ config: EngineConfig, onProgress: (@Sendable (Float) -> Void)? = nil
    ) async throws -> Uhlm {
        try await Task.detached(priority: .userInitiated) {
            try Uhlm(config: config, onProgress: onProgress)
        }.value
    }

    /// Generates from `prompt`; `onToken` sees every final token in order, on an engine thread,
    /// and `onLinkChange` each time the server link goes down (tokens go on as `.offline`) or
    /// comes back, with a sentence saying why. Throws `UhlmError` (`.Cancelled` when the task is
    /// cancelled).
    public func generate(
        _ prompt: String,
        options: GenerationOptions = GenerationOptions(),
        onToken: @escaping @Sendable (TokenEvent) -> Void = { _ in },
        onLinkChange: @escaping @Sendable (Bool, String) -> Void = { _, _ in }
    ) async throws -> GenerationSummary {
        let engine = self.engine
        let listener = Listener(onToken, onLinkChange)
        // uniffi's Swift futures do not observe task cancellation; cancel through the engine.
        return try await withTaskCancellationHandler {
            try await engine.generate(prompt: prompt, options: options, listener: listener)
        } onCancel: {
            engine.cancel()
        }
    }

    /// `generate` for a conversation, rendered with the model's chat template.
    public func generate(
        messages: [ChatMessage],
        options: GenerationOptions = GenerationOptions(),
        onToken: @escaping @Sendable (TokenEvent) -> Void = { _ in },
        onLinkChange: @escaping @Sendable (Bool, String) -> Void = { _, _ in }
    ) async throws -> GenerationSummary {
        let engine = self.engine
        let listener = Listener(onToken, onLinkChange)
        return try await withTaskCancellationHandler {
            try await engine.generateChat(messages: messages, options: options, listener: listener)
        } onCancel: {
            engine.cancel()
        }
    }

    /// The tokens of one generation. Terminating the stream (leaving the `for try await` loop,
    /// or cancelling its task) cancels the generation.
    public nonisolated func stream(
        _ prompt: String,
        options: GenerationOptions = GenerationOptions()
    ) -> AsyncThrowingStream<TokenEvent, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    _ = try await self.generate(prompt, options: options) { continuation.yield($0) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Cancels every generation of this engine in flight.
    public nonisolated func cancel() { engine.cancel() }

    /// Counters over every generation so far.
    public nonisolated func stats() -> EngineStats { engine.stats() }

    /// The on-device model's vocabulary size: sending each token's dense f32 distribution (the
    /// papers' HLM baseline) costs 4 bytes times this, the reference for "uplink bytes saved".
    public nonisolated func vocabSize() -> UInt32 { engine.vocabSize() }

    /// Call from an `NWPathMonitor` update when the device switches networks.
    public nonisolated func networkChanged() { engine.networkChanged() }
}

/// Forwards token events and link changes to closures.
private final class Listener: TokenListener, @unchecked Sendable {
    private let onTokenHandler: @Sendable (TokenEvent) -> Void
    private let onLinkChangeHandler: @Sendable (Bool, String) -> Void

    init(
        _ onToken: @escaping @Sendable (TokenEvent) -> Void,
        _ onLinkChange: @escaping @Sendable (Bool, String) -> Void
    ) {
        onTokenHandler = onToken
        onLinkChangeHandler = onLinkChange
    }

    func onToken(event: TokenEvent) { onTokenHandler(event) }

    func onLinkChange(online: Bool, detail: String) { onLinkChangeHandler(online, detail) }

    func onTailText(text: String) {}
}

/// Hands loading progress to a closure.
private final class ProgressForwarder: LoadProgressListener, @unchecked Sendable {
    private let onProgress: @Sendable (Float) -> Void

    init(_ onProgress: @escaping @Sendable (Float) -> Void) {
        self.onProgress = onProgress
    }

    func onProgress(fraction: Float) {
        onProgress(fraction)
    }
}

// uniffi gives `UhlmError` the Rust `Display` text as `description` but not the conformance that
// makes `String(describing:)`, string interpolation and `localizedDescription` use it: without
// it they show the enum case (`ModelNotFound(path: ...)`), as the XCTest suite found.
extension UhlmError: CustomStringConvertible {}
