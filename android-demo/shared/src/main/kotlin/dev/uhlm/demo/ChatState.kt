package dev.uhlm.demo

import dev.uhlm.GenerationSummary
import dev.uhlm.TokenSource

/** A run of reply text decided the same way, shown in one colour. */
data class Piece(val text: String, val source: TokenSource)

/** One entry of the transcript. */
sealed interface Turn {
    data class User(val text: String) : Turn

    /**
     * The model's answer as it streams in. [summary] arrives when the generation finished;
     * an interrupted reply keeps the tokens it had and has none.
     */
    data class Reply(
        val pieces: List<Piece> = emptyList(),
        val summary: GenerationSummary? = null,
    ) : Turn {
        val text: String get() = pieces.joinToString("") { it.text }

        /** Appends a token's text, merging it into the last piece when the source is the same. */
        fun plus(text: String, source: TokenSource): Reply {
            val last = pieces.lastOrNull()
            val merged = if (last != null && last.source == source) {
                pieces.dropLast(1) + last.copy(text = last.text + text)
            } else {
                pieces + Piece(text, source)
            }
            return copy(pieces = merged)
        }
    }
}

/** What the app is busy with; at most one thing at a time. */
sealed interface Phase {
    data object Idle : Phase

    /** Fetching the on-device model; [progress] is null while its size is unknown. */
    data class PreparingModel(val progress: Float?) : Phase

    /** Reading the on-device model into memory. */
    data class LoadingEngine(val progress: Float) : Phase

    data object Generating : Phase
}

/** The server link as the engine last reported it (`TokenListener.onLinkChange`). */
data class Link(val online: Boolean, val detail: String)

/** Everything the screens draw. */
data class ChatState(
    val settings: DemoSettings,
    val phase: Phase = Phase.Idle,
    val turns: List<Turn> = emptyList(),
    /** Null until a generation has run on the current engine. */
    val counters: Counters? = null,
    /** Null until the engine said something about the link. */
    val link: Link? = null,
    /** The on-device model's path once it is ready. */
    val modelPath: String? = null,
    /** A readable sentence about the last thing that went wrong or was cancelled. */
    val notice: String? = null,
) {
    val busy: Boolean get() = phase != Phase.Idle
}
