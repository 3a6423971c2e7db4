import Foundation
import UHLM

/// The counters row as the screen shows it, from the engine's stats (the Kotlin app's
/// `Counters` and `CounterText`). Worked out here rather than in the view, so that the tests
/// check the very text on screen.
struct Counters: Equatable {
    let tokens: String
    /// Share of the decisions made on the device without asking the server.
    let onDevice: String
    let uplink: String
    /// Share of the uplink saved against sending each decision's dense f32 distribution (the
    /// papers' HLM baseline: 4 bytes times the vocabulary per token); "–" before any decision.
    let saved: String
    let tokensPerSecond: String
    /// Mean round-trip time to the server; nil before the first round trip.
    let roundTrip: String?

    init(_ stats: EngineStats, vocabSize: UInt32) {
        let decisions = Double(stats.decisions)
        let baseline = decisions * 4 * Double(vocabSize)
        tokens = "\(stats.generatedTokens)"
        onDevice = Self.percent(decisions > 0 ? Double(stats.skipped) / decisions : 0)
        uplink = "\(stats.uplinkBytes) B"
        saved = baseline > 0 ? Self.percent(1 - Double(stats.uplinkBytes) / baseline) : "–"
        tokensPerSecond = String(format: "%.1f", stats.tokensPerSecond)
        roundTrip = stats.roundTrips > 0 ? String(format: "%.0f ms", stats.rttMeanMs) : nil
    }

    private static func percent(_ fraction: Double) -> String {
        String(format: "%.1f %%", fraction * 100)
    }
}
