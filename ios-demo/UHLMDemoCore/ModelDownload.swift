import Foundation

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Where the on-device model comes from: downloaded on the phone (`DownloadedModel`), the
/// model cache in tests (the Kotlin app's `ModelSource`).
protocol ModelSource: Sendable {
    /// The GGUF's path, fetched first where needed; `onProgress` gets the fraction done where
    /// the size is known.
    func prepare(_ settings: DemoSettings, onProgress: @escaping @Sendable (Double) -> Void) async throws -> String
}

/// The model at the settings' download address, fetched once into Application Support.
struct DownloadedModel: ModelSource {
    func prepare(_ settings: DemoSettings, onProgress: @escaping @Sendable (Double) -> Void) async throws -> String {
        try await ModelDownload.prepare(from: settings.modelUrl, onProgress: onProgress).path
    }
}

/// An answer as the download reads it: the HTTP status, the announced length (-1 when
/// unknown) and the body in chunks.
struct ModelResponse {
    let status: Int
    let expectedLength: Int64
    let body: AsyncThrowingStream<Data, Error>
}

/// How a download reaches the network: `URLSession` in the app, a stand-in in tests.
typealias ModelFetch = @Sendable (URL) async throws -> ModelResponse

/// Downloads the on-device GGUF once, with progress, into a `.part` file that becomes the model
/// only when the whole body arrived; cancelling the calling task cancels the transfer.
enum ModelDownload {
    /// Bytes gathered before each write (and progress report).
    static let chunkSize = 1 << 20

    /// The model at `address` in `directory` (Application Support unless given), downloaded
    /// through `fetch` unless it is already there.
    static func prepare(
        from address: String,
        into directory: URL? = nil,
        fetch: ModelFetch = urlSession,
        onProgress: @escaping @Sendable (Double) -> Void
    ) async throws -> URL {
        guard let url = URL(string: address.trimmingCharacters(in: .whitespaces)), url.scheme == "https" else {
            throw DownloadError("set the model's HTTPS download address in Settings")
        }
        let dir = try directory ?? FileManager.default.url(
            for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let dest = dir.appendingPathComponent(url.lastPathComponent.isEmpty ? "model.gguf" : url.lastPathComponent)
        if FileManager.default.fileExists(atPath: dest.path) { return dest }

        let response = try await fetch(url)
        guard response.status == 200 else {
            throw DownloadError("downloading \(url): the server answered HTTP \(response.status)")
        }
        let total = response.expectedLength
        let part = dest.appendingPathExtension("part")
        guard FileManager.default.createFile(atPath: part.path, contents: nil) else {
            throw DownloadError("cannot create \(part.path)")
        }
        let handle = try FileHandle(forWritingTo: part)
        defer { try? handle.close(); try? FileManager.default.removeItem(at: part) }
        var received: Int64 = 0
        for try await chunk in response.body {
            try handle.write(contentsOf: chunk)
            received += Int64(chunk.count)
            if total > 0 { onProgress(Double(received) / Double(total)) }
        }
        // A cancelled task ends the body's iteration early, without an error: never keep that
        // as the model.
        try Task.checkCancellation()
        // Shorter than announced: the connection ended early. (Longer is a body the session
        // decompressed, which the announced length does not count.)
        if total > 0, received < total {
            throw DownloadError("downloading \(url): the body ended after \(received) of \(total) bytes")
        }
        try handle.close()
        try FileManager.default.moveItem(at: part, to: dest)
        onProgress(1)
        return dest
    }

    /// The network through `URLSession.shared`.
    static let urlSession: ModelFetch = { url in
        #if canImport(FoundationNetworking)
        // swift-corelibs-foundation (Linux) has no `bytes(from:)`: the body arrives whole.
        let (data, response) = try await URLSession.shared.data(from: url)
        return ModelResponse(
            status: (response as? HTTPURLResponse)?.statusCode ?? 0,
            expectedLength: response.expectedContentLength,
            body: AsyncThrowingStream { continuation in
                continuation.yield(data)
                continuation.finish()
            })
        #else
        let (bytes, response) = try await URLSession.shared.bytes(from: url)
        return ModelResponse(
            status: (response as? HTTPURLResponse)?.statusCode ?? 0,
            expectedLength: response.expectedContentLength,
            body: AsyncThrowingStream { continuation in
                let reader = Task {
                    do {
                        var buffer = Data(capacity: chunkSize)
                        for try await byte in bytes {
                            buffer.append(byte)
                            if buffer.count == chunkSize {
                                continuation.yield(buffer)
                                buffer.removeAll(keepingCapacity: true)
                            }
                        }
                        continuation.yield(buffer)
                        continuation.finish()
                    } catch {
                        continuation.finish(throwing: error)
                    }
                }
                // Leaving the iteration (or cancelling its task) cancels the transfer.
                continuation.onTermination = { _ in reader.cancel() }
            })
        #endif
    }
}

struct DownloadError: LocalizedError, Equatable {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}
