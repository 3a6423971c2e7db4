import Foundation

/// Downloads the on-device GGUF once into Application Support, with progress; cancelling the
/// calling task cancels the transfer (URLSession's async API observes task cancellation).
enum ModelDownload {
    static func prepare(from address: String, onProgress: @escaping @Sendable (Double) -> Void) async throws -> URL {
        guard let url = URL(string: address.trimmingCharacters(in: .whitespaces)), url.scheme == "https" else {
            throw DownloadError("set the model's HTTPS download address in Settings")
        }
        let dir = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                              appropriateFor: nil, create: true)
        let dest = dir.appendingPathComponent(url.lastPathComponent.isEmpty ? "model.gguf" : url.lastPathComponent)
        if FileManager.default.fileExists(atPath: dest.path) { return dest }

        let (bytes, response) = try await URLSession.shared.bytes(from: url)
        guard let http = response as? HTTPURLResponse, http.statusCode == 200 else {
            throw DownloadError("downloading \(url): the server answered HTTP \((response as? HTTPURLResponse)?.statusCode ?? 0)")
        }
        let total = response.expectedContentLength
        let part = dest.appendingPathExtension("part")
        FileManager.default.createFile(atPath: part.path, contents: nil)
        let handle = try FileHandle(forWritingTo: part)
        defer { try? handle.close(); try? FileManager.default.removeItem(at: part) }
        var buffer = Data(capacity: 1 << 20)
        var received: Int64 = 0
        for try await byte in bytes {
            buffer.append(byte)
            if buffer.count == 1 << 20 {
                try handle.write(contentsOf: buffer)
                received += Int64(buffer.count)
                buffer.removeAll(keepingCapacity: true)
                if total > 0 { onProgress(Double(received) / Double(total)) }
            }
        }
        try handle.write(contentsOf: buffer)
        try handle.close()
        try FileManager.default.moveItem(at: part, to: dest)
        onProgress(1)
        return dest
    }
}

struct DownloadError: LocalizedError {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}
