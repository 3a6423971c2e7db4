import Foundation
import XCTest

@testable import UHLMDemoCore

/// The model download against a stand-in for the network: what reaches the disk, and when.
final class ModelDownloadTests: XCTestCase {
    private var dir: URL!

    override func setUp() {
        super.setUp()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("uhlm-download-\(UUID().uuidString)")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(at: dir)
        super.tearDown()
    }

    private let address = "https://models.example/drafts/draft.gguf"

    func testTheBodyBecomesTheModelWithProgressUpToOne() async throws {
        let chunks = [Data(repeating: 1, count: 3), Data(repeating: 2, count: 5), Data(repeating: 3, count: 2)]
        let progress = Fractions()
        let model = try await ModelDownload.prepare(
            from: address, into: dir, fetch: Self.answer(200, chunks), onProgress: { progress.append($0) })
        XCTAssertEqual(model, dir.appendingPathComponent("draft.gguf"))
        XCTAssertEqual(try Data(contentsOf: model), chunks.reduce(Data(), +))
        XCTAssertEqual(progress.all, [0.3, 0.8, 1.0, 1.0])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["draft.gguf"])
    }

    func testAModelAlreadyThereIsNotFetchedAgain() async throws {
        _ = try await ModelDownload.prepare(
            from: address, into: dir, fetch: Self.answer(200, [Data("gguf".utf8)]), onProgress: { _ in })
        let model = try await ModelDownload.prepare(
            from: address, into: dir,
            fetch: { _ in throw DownloadError("fetched a second time") }, onProgress: { _ in })
        XCTAssertEqual(try Data(contentsOf: model), Data("gguf".utf8))
    }

    func testAnAddressThatIsNotHttpsIsRefused() async throws {
        for address in ["", "http://models.example/draft.gguf", "not a url"] {
            do {
                _ = try await ModelDownload.prepare(
                    from: address, into: dir, fetch: { _ in throw DownloadError("fetched") }, onProgress: { _ in })
                XCTFail("\(address) was fetched")
            } catch let error as DownloadError {
                XCTAssertEqual(error.localizedDescription, "set the model's HTTPS download address in Settings")
            }
        }
    }

    func testAnHttpErrorIsASentenceAndLeavesNoFile() async throws {
        do {
            _ = try await ModelDownload.prepare(
                from: address, into: dir, fetch: Self.answer(404, []), onProgress: { _ in })
            XCTFail("a 404 became a model")
        } catch let error as DownloadError {
            XCTAssertEqual(error.localizedDescription, "downloading \(address): the server answered HTTP 404")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testABodyShorterThanAnnouncedIsNoModel() async throws {
        do {
            _ = try await ModelDownload.prepare(
                from: address, into: dir, fetch: Self.answer(200, [Data(count: 4)], length: 10), onProgress: { _ in })
            XCTFail("a truncated body became a model")
        } catch let error as DownloadError {
            XCTAssertEqual(error.localizedDescription, "downloading \(address): the body ended after 4 of 10 bytes")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testCancellingTheTaskStopsTheDownloadAndKeepsNothing() async throws {
        let started = expectation(description: "the first chunk arrived")
        // One chunk, then a body that never ends.
        let fetch: ModelFetch = { _ in
            ModelResponse(status: 200, expectedLength: 100, body: AsyncThrowingStream { $0.yield(Data(count: 10)) })
        }
        let dir = self.dir!
        let download = Task {
            try await ModelDownload.prepare(from: address, into: dir, fetch: fetch, onProgress: { _ in started.fulfill() })
        }
        await fulfillment(of: [started], timeout: 60)
        download.cancel()
        do {
            _ = try await download.value
            XCTFail("a cancelled download became a model")
        } catch is CancellationError {
            // expected
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    /// A stand-in network answering `status` with `chunks` (announcing their length unless told).
    private static func answer(_ status: Int, _ chunks: [Data], length: Int64? = nil) -> ModelFetch {
        { _ in
            ModelResponse(
                status: status, expectedLength: length ?? Int64(chunks.reduce(0) { $0 + $1.count }),
                body: AsyncThrowingStream { continuation in
                    for chunk in chunks { continuation.yield(chunk) }
                    continuation.finish()
                })
        }
    }
}

/// Progress reports, from whichever thread makes them.
private final class Fractions: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Double] = []

    func append(_ value: Double) {
        lock.lock()
        values.append(value)
        lock.unlock()
    }

    var all: [Double] {
        lock.lock()
        defer { lock.unlock() }
        return values
    }
}
