import UHLM
import XCTest

@testable import UHLMDemoCore

/// The counters row's text from given stats: the arithmetic and the empty cases.
final class CountersTests: XCTestCase {
    func testTheRowFromAGenerationsStats() {
        // 40 decisions, 30 on the device; 1 600 B against the dense baseline 40 × 4 × 1000 B.
        let c = Counters(
            stats(decisions: 40, skipped: 30, uplinkBytes: 1_600, roundTrips: 10, rttMeanMs: 12.4,
                  tokensPerSecond: 17.26, generatedTokens: 39),
            vocabSize: 1_000)
        XCTAssertEqual(c.tokens, "39")
        XCTAssertEqual(c.onDevice, "75.0 %")
        XCTAssertEqual(c.uplink, "1600 B")
        XCTAssertEqual(c.saved, "99.0 %")
        XCTAssertEqual(c.tokensPerSecond, "17.3")
        XCTAssertEqual(c.roundTrip, "12 ms")
    }

    func testBeforeAnyDecisionOrRoundTrip() {
        let c = Counters(stats(), vocabSize: 49_152)
        XCTAssertEqual(c.tokens, "0")
        XCTAssertEqual(c.onDevice, "0.0 %")
        XCTAssertEqual(c.uplink, "0 B")
        XCTAssertEqual(c.saved, "–")
        XCTAssertEqual(c.tokensPerSecond, "0.0")
        XCTAssertNil(c.roundTrip)
    }

    private func stats(
        decisions: UInt64 = 0, skipped: UInt64 = 0, uplinkBytes: UInt64 = 0, roundTrips: UInt64 = 0,
        rttMeanMs: Double = 0, tokensPerSecond: Double = 0, generatedTokens: UInt64 = 0
    ) -> EngineStats {
        EngineStats(
            generations: 1, decisions: decisions, drafted: decisions, skipped: skipped,
            sent: decisions - skipped, accepted: decisions - skipped, resampled: 0, remote: 0, offline: 0,
            uplinkBytes: uplinkBytes, downlinkBytes: 0, roundTrips: roundTrips, rttMeanMs: rttMeanMs,
            rttP50Ms: rttMeanMs, rttP95Ms: rttMeanMs, reconnects: 0, elapsedMs: 0,
            tokensPerSecond: tokensPerSecond, generatedTokens: generatedTokens)
    }
}
