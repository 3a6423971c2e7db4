package dev.uhlm

import java.io.Closeable
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.withContext

/**
 * The uhlm engine for Kotlin apps: a thin, coroutine-shaped layer over the generated
 * [HybridEngine].
 *
 * Load it with [Uhlm.load] (off the main thread), generate with [generate] or [stream], and
 * [close] it to release the on-device model. Cancelling the coroutine that awaits [generate]
 * or collects [stream] cancels the generation in Rust.
 */
class Uhlm private constructor(private val engine: HybridEngine) : Closeable {
    companion object {
        /**
         * Loads the on-device model on [Dispatchers.IO], telling [onProgress] the fraction
         * read so far (0 to 1, on the loading thread). Throws [UhlmException].
         */
        suspend fun load(config: EngineConfig, onProgress: (Float) -> Unit = {}): Uhlm =
            withContext(Dispatchers.IO) {
                val progress = object : LoadProgressListener {
                    override fun onProgress(fraction: Float) = onProgress(fraction)
                }
                Uhlm(HybridEngine.withProgress(config, progress))
            }
    }

    /**
     * Generates from [prompt]; [onToken] sees every final token in order (on an engine
     * thread: keep it quick), [onLinkChange] each time the server link goes down (the tokens
     * go on as [TokenSource.OFFLINE]) or comes back, with a sentence saying why. Returns the
     * summary or throws [UhlmException].
     */
    suspend fun generate(
        prompt: String,
        options: GenerationOptions = GenerationOptions(),
        onLinkChange: (online: Boolean, detail: String) -> Unit = { _, _ -> },
        onToken: (TokenEvent) -> Unit = {},
    ): GenerationSummary = engine.generate(prompt, options, Listener(onToken, onLinkChange))

    /** [generate] for a conversation, rendered with the model's chat template. */
    suspend fun generate(
        messages: List<ChatMessage>,
        options: GenerationOptions = GenerationOptions(),
        onLinkChange: (online: Boolean, detail: String) -> Unit = { _, _ -> },
        onToken: (TokenEvent) -> Unit = {},
    ): GenerationSummary =
        engine.generateChat(messages, options, Listener(onToken, onLinkChange))

    /**
     * The tokens of one generation as a cold [Flow]: each collection starts a generation, and
     * cancelling the collector (or `take(n)`) cancels it. Errors arrive as [UhlmException].
     */
    fun stream(
        prompt: String,
        options: GenerationOptions = GenerationOptions(),
    ): Flow<TokenEvent> = callbackFlow {
        // The engine never waits on the collector: events are buffered without bound.
        engine.generate(prompt, options, Listener(onToken = { trySend(it) }))
        close()
        awaitClose()
    }.buffer(Channel.UNLIMITED)

    /** Cancels every generation of this engine in flight; they throw [UhlmException.Cancelled]. */
    fun cancel() = engine.cancel()

    /** Counters over every generation so far. */
    fun stats(): EngineStats = engine.stats()

    /**
     * The on-device model's vocabulary size: sending each token's dense f32 distribution (the
     * papers' HLM baseline) costs 4 bytes times this, the reference for "uplink bytes saved".
     */
    fun vocabSize(): UInt = engine.vocabSize()

    /** Call from a network callback when the device switches networks. */
    fun networkChanged() = engine.networkChanged()

    /** Releases the on-device model and the server connection. */
    override fun close() = engine.close()

    private class Listener(
        private val onToken: (TokenEvent) -> Unit,
        private val onLinkChange: (Boolean, String) -> Unit = { _, _ -> },
    ) : TokenListener {
        override fun onToken(event: TokenEvent) = onToken.invoke(event)

        override fun onLinkChange(online: Boolean, detail: String) =
            onLinkChange.invoke(online, detail)

        override fun onTailText(text: String) {}
    }
}
