package dev.uhlm.demo

import dev.uhlm.EngineStats
import java.util.Locale

/**
 * The live counters, over every generation of the current engine (`Uhlm.stats()`): what the
 * hybrid design saves, on screen.
 */
data class Counters(
    val tokens: ULong,
    /** Share of the decisions made on the device without asking the server, 0 to 1. */
    val skipRate: Double,
    val uplinkBytes: ULong,
    /**
     * Share of the uplink saved against sending each decision's dense f32 distribution (the
     * papers' HLM baseline: 4 bytes times the vocabulary per token), 0 to 1.
     */
    val uplinkSaved: Double,
    val tokensPerSecond: Double,
    /** Mean round-trip time to the server, null before the first round trip. */
    val rttMs: Double?,
) {
    companion object {
        fun of(stats: EngineStats, vocabSize: UInt): Counters {
            val decisions = stats.decisions.toDouble()
            val baseline = decisions * 4.0 * vocabSize.toDouble()
            return Counters(
                tokens = stats.generatedTokens,
                skipRate = if (decisions > 0) stats.skipped.toDouble() / decisions else 0.0,
                uplinkBytes = stats.uplinkBytes,
                uplinkSaved = if (baseline > 0) 1.0 - stats.uplinkBytes.toDouble() / baseline else 0.0,
                tokensPerSecond = stats.tokensPerSecond,
                rttMs = stats.rttMeanMs.takeIf { stats.roundTrips > 0uL },
            )
        }
    }
}

/** How the counters read on screen; the same words on every platform. */
object CounterText {
    fun percent(fraction: Double): String = String.format(Locale.ROOT, "%.1f %%", fraction * 100)

    fun bytes(bytes: ULong): String = when {
        bytes < 10_000uL -> "$bytes B"
        bytes < 10_000_000uL -> String.format(Locale.ROOT, "%.1f kB", bytes.toDouble() / 1e3)
        else -> String.format(Locale.ROOT, "%.1f MB", bytes.toDouble() / 1e6)
    }

    fun rate(tokensPerSecond: Double): String = String.format(Locale.ROOT, "%.1f", tokensPerSecond)

    fun millis(ms: Double?): String = ms?.let { String.format(Locale.ROOT, "%.0f ms", it) } ?: "–"
}
