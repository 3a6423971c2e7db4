package dev.uhlm.demo

import dev.uhlm.EngineConfig
import dev.uhlm.GenerationOptions
import dev.uhlm.Mode
import dev.uhlm.TokenEvent
import dev.uhlm.Uhlm
import dev.uhlm.UhlmException
import dev.uhlm.describeError
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancel
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch

/**
 * The demo's logic, shared by Android and the desktop: settings, the on-device model, the engine
 * and one chat, exposed as a [StateFlow] of [ChatState] that the screens draw.
 *
 * Its work runs on one confined dispatcher, so loading, generating and replacing the engine
 * never overlap; [cancel], [networkChanged] and [close] reach the engine from the UI thread
 * (the engine's own methods are thread-safe), and the engine's callbacks (on Rust threads)
 * update [state], which is thread-safe, and repeat a pending Cancel. Each message is answered
 * on its own (one user turn, the model's chat template): a small on-device model does better
 * without a long history, and the demo is about how the tokens are decided.
 */
class ChatViewModel(
    private val store: SettingsStore,
    private val models: ModelSource,
    private val options: GenerationOptions = GenerationOptions(maxTokens = 160u, chatTemplate = true),
    /**
     * For tests: runs once the phase is Generating, just before the engine is asked, the
     * instant a Cancel used to be lost in ([cancelRequested]).
     */
    internal val beforeGenerate: () -> Unit = {},
) : AutoCloseable {
    private val scope = CoroutineScope(SupervisorJob() + Dispatchers.Default.limitedParallelism(1))
    private val _state = MutableStateFlow(ChatState(settings = store.load()))
    val state: StateFlow<ChatState> = _state.asStateFlow()

    // Written on the confined dispatcher; read by [cancel] from the UI thread.
    @Volatile private var engine: Uhlm? = null
    @Volatile private var job: Job? = null

    /**
     * A Cancel pressed during this generation. The engine's `cancel` ends only generations it
     * has registered, so a Cancel in the instant before `generate` reaches Rust is repeated
     * at the first token ([onToken]) rather than lost.
     */
    @Volatile private var cancelRequested = false

    /** The settings and model [engine] was loaded with: it is reloaded when they change. */
    private var engineKey: Pair<DemoSettings, String>? = null

    /** Saves [settings]; the next message loads an engine with them. */
    fun saveSettings(settings: DemoSettings) = launchIdle {
        store.save(settings)
        _state.update { it.copy(settings = settings, notice = null) }
    }

    fun setMode(mode: Mode) = saveSettings(_state.value.settings.copy(mode = mode))

    /** Fetches the on-device model now (it is also fetched on the first message). */
    fun prepareModel() = launchIdle { ensureModel() }

    /** Answers [prompt], streaming the reply's tokens into the transcript. */
    fun send(prompt: String) {
        if (prompt.isBlank()) return
        launchIdle {
            _state.update { it.copy(notice = null, turns = it.turns + Turn.User(prompt.trim())) }
            val model = ensureModel() ?: return@launchIdle
            val uhlm = loadEngine(model) ?: return@launchIdle
            generate(uhlm, prompt.trim())
        }
    }

    /**
     * Stops what is running: a generation ends with the engine's own "cancelled" error (shown
     * as the notice, tokens so far kept; see [cancelRequested]); a model download stops at
     * its next read. A blocking native call (loading the engine, the desktop's model cache)
     * runs to its end first: its result is then dropped.
     */
    fun cancel() {
        val running = job ?: return
        if (_state.value.phase == Phase.Generating) {
            cancelRequested = true
            engine?.cancel()
        } else {
            running.cancel()
        }
    }

    fun dismissNotice() = _state.update { it.copy(notice = null) }

    /** Tells the engine the device switched networks (from a platform network callback). */
    fun networkChanged() {
        engine?.networkChanged()
    }

    /** Stops everything and releases the on-device model. */
    override fun close() {
        engine?.cancel()
        scope.cancel()
        engine?.close()
        engine = null
    }

    /** Runs [block] unless something else is running (the screens disable their buttons too). */
    private fun launchIdle(block: suspend CoroutineScope.() -> Unit) {
        scope.launch {
            if (job?.isActive == true) return@launch
            job = scope.launch {
                try {
                    block()
                } finally {
                    _state.update { it.copy(phase = Phase.Idle) }
                }
            }
        }
    }

    private suspend fun ensureModel(): String? {
        _state.value.modelPath?.let { return it }
        _state.update { it.copy(phase = Phase.PreparingModel(null)) }
        return attempt("Model download cancelled.") {
            models.prepare(_state.value.settings) { p ->
                _state.update { it.copy(phase = Phase.PreparingModel(p)) }
            }
        }?.also { path -> _state.update { it.copy(modelPath = path) } }
    }

    private suspend fun loadEngine(model: String): Uhlm? {
        val settings = _state.value.settings
        val key = settings to model
        engine?.let { if (engineKey == key) return it }
        engine?.close()
        engine = null
        _state.update { it.copy(phase = Phase.LoadingEngine(0f), counters = null, link = null) }
        val config = EngineConfig(
            slmPath = model,
            server = settings.server.trim().ifEmpty { null },
            pin = settings.pin.trim().lowercase().ifEmpty { null },
            apiKey = settings.apiKey.trim(),
            mode = settings.mode,
        )
        return attempt("Loading the model was cancelled.") {
            Uhlm.load(config) { p -> _state.update { it.copy(phase = Phase.LoadingEngine(p)) } }
        }?.also {
            engine = it
            engineKey = key
        }
    }

    private suspend fun generate(uhlm: Uhlm, prompt: String) = coroutineScope {
        // Cleared before the phase says Generating: a Cancel from then on is this one's.
        cancelRequested = false
        _state.update { it.copy(phase = Phase.Generating, turns = it.turns + Turn.Reply()) }
        val vocab = uhlm.vocabSize()
        // The counters move while tokens stream, not only at the end.
        val ticker = launch {
            while (true) {
                delay(COUNTER_REFRESH_MS)
                _state.update { it.copy(counters = Counters.of(uhlm.stats(), vocab)) }
            }
        }
        beforeGenerate()
        val summary = attempt("Generation cancelled.") {
            uhlm.generate(prompt, options, onLinkChange = ::onLinkChange, onToken = ::onToken)
        }
        ticker.cancel()
        _state.update { s ->
            val reply = s.turns.last() as Turn.Reply
            val turns = when {
                summary != null -> s.turns.dropLast(1) + reply.copy(summary = summary)
                reply.pieces.isEmpty() -> s.turns.dropLast(1)
                else -> s.turns
            }
            s.copy(turns = turns, counters = Counters.of(uhlm.stats(), vocab))
        }
    }

    private fun onToken(event: TokenEvent) {
        _state.update { s ->
            val reply = s.turns.lastOrNull() as? Turn.Reply ?: return@update s
            s.copy(turns = s.turns.dropLast(1) + reply.plus(event.text, event.source))
        }
        if (cancelRequested) engine?.cancel()
    }

    private fun onLinkChange(online: Boolean, detail: String) =
        _state.update { it.copy(link = Link(online, detail)) }

    /**
     * Runs [block], turning what can go wrong into a readable notice instead of a crash: a
     * cancelled job as [cancelled], the engine's errors in its own words ([describeError]: a
     * wrong API key, an unreachable server, a cancelled generation), and anything else (a
     * download's I/O errors) by its message.
     */
    private suspend fun <T> attempt(cancelled: String, block: suspend () -> T): T? = try {
        block()
    } catch (e: CancellationException) {
        notice(cancelled)
        throw e
    } catch (e: UhlmException) {
        notice(describeError(e))
    } catch (e: Exception) {
        notice(e.message ?: e.toString())
    }

    private fun notice(text: String): Nothing? {
        _state.update { it.copy(notice = text) }
        return null
    }

    private companion object {
        const val COUNTER_REFRESH_MS = 250L
    }
}
