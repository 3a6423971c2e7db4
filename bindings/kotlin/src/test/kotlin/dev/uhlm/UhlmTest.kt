package dev.uhlm

import java.util.Collections
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance
import org.junit.jupiter.api.assertThrows

/**
 * The whole hybrid loop on the host JVM: an [EmbeddedServer] with the default LLM, an engine
 * with the default derived draft, through the host build of libuhlm_ffi.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class UhlmTest {
    private lateinit var models: DefaultModels
    private lateinit var server: EmbeddedServer

    @BeforeAll
    fun startServer() {
        models = ensureDefaultModels()
        server = EmbeddedServer.start(models.llmPath, null)
    }

    @AfterAll
    fun stopServer() {
        server.stop()
        server.close()
    }

    private fun config(mode: Mode, apiKey: String = server.apiKey()) = EngineConfig(
        slmPath = models.slmPath,
        server = server.address(),
        pin = server.certFingerprint(),
        apiKey = apiKey,
        mode = mode,
    )

    private val greedy = GenerationOptions(temperature = 0.0f, maxTokens = 16u)

    @Test
    fun `a hybrid generation streams tokens in order and its counts add up`() = runBlocking {
        val progress = Collections.synchronizedList(mutableListOf<Float>())
        Uhlm.load(config(Mode.HLM)) { progress += it }.use { uhlm ->
            assertTrue(progress.size > 2, "progress reports: $progress")
            assertEquals(progress.sorted(), progress.toList())
            assertEquals(1.0f, progress.last())
            val events = Collections.synchronizedList(mutableListOf<TokenEvent>())
            val links = Collections.synchronizedList(mutableListOf<Boolean>())
            val summary = uhlm.generate(
                "The capital of France is",
                greedy,
                onLinkChange = { online, _ -> links += online },
            ) { events += it }

            // The session opened once and never dropped on loopback.
            assertEquals(listOf(true), links.toList())
            // SmolLM2's vocabulary, which the derived draft keeps.
            assertEquals(49152u, uhlm.vocabSize())

            assertTrue(summary.tokenIds.isNotEmpty())
            assertEquals(summary.tokenIds.indices.map { it.toUInt() }, events.map { it.position })
            assertEquals(summary.tokenIds, events.map { it.tokenId })
            assertEquals(summary.sources, events.map { it.source })
            // HLM sends every draft: each token was decided by the server.
            assertTrue(summary.sources.all { it == TokenSource.ACCEPTED || it == TokenSource.RESAMPLED })
            val s = summary.stats
            assertEquals(s.accepted + s.resampled, s.sent)
            assertEquals(s.skipped + s.sent + s.offline, s.drafted)
            assertEquals(0uL, s.offline)
            assertEquals(summary.tokenIds.size.toULong(), s.generatedTokens)
            assertTrue(s.decisions >= s.generatedTokens)
            assertTrue(summary.text.startsWith(events.joinToString("") { it.text }))
            assertEquals(1uL, uhlm.stats().generations)
        }
    }

    @Test
    fun `the flow yields the same tokens as generate`() = runBlocking {
        Uhlm.load(config(Mode.UHLM)).use { uhlm ->
            val summary = uhlm.generate("Once upon a time", greedy)
            val streamed = uhlm.stream("Once upon a time", greedy).toList()
            assertEquals(summary.tokenIds, streamed.map { it.tokenId })
            assertTrue(streamed.all { it.source != TokenSource.OFFLINE })
        }
    }

    @Test
    fun `cancelling the collector stops the generation`() = runBlocking {
        Uhlm.load(config(Mode.HLM)).use { uhlm ->
            val long = GenerationOptions(temperature = 0.0f, maxTokens = 200u)
            val first = uhlm.stream("Once upon a time, in a land far away,", long).take(3).toList()
            assertEquals(listOf(0u, 1u, 2u), first.map { it.position })
            // The engine runs one generation at a time: this one only completes if the
            // cancelled one ended.
            val next = uhlm.generate("Hello", GenerationOptions(temperature = 0.0f, maxTokens = 2u))
            assertTrue(next.tokenIds.size <= 2)
            assertTrue(uhlm.stats().generatedTokens < 200uL)
        }
    }

    @Test
    fun `cancel ends a generation with Cancelled`() = runBlocking {
        Uhlm.load(config(Mode.HLM)).use { uhlm ->
            val seen = Collections.synchronizedList(mutableListOf<TokenEvent>())
            val long = GenerationOptions(temperature = 0.0f, maxTokens = 200u)
            assertThrows<UhlmException.Cancelled> {
                uhlm.generate("Once upon a time, in a land far away,", long) {
                    seen += it
                    if (seen.size == 2) uhlm.cancel()
                }
            }
            assertTrue(seen.size in 2 until 200)
        }
    }

    @Test
    fun `a missing model file is ModelNotFound`() {
        val e = assertThrows<UhlmException.ModelNotFound> {
            HybridEngine(EngineConfig(slmPath = "/nonexistent/uhlm-draft.gguf", mode = Mode.SLM))
        }
        assertTrue(e.path.contains("uhlm-draft.gguf"))
        assertEquals("on-device model not found: /nonexistent/uhlm-draft.gguf", e.toString())
    }

    @Test
    fun `a wrong API key is Unauthorized`() = runBlocking {
        Uhlm.load(config(Mode.HLM, apiKey = "not-the-key")).use { uhlm ->
            val e = assertThrows<UhlmException.Unauthorized> { uhlm.generate("Hello", greedy) }
            assertTrue(e.toString().startsWith("the server rejected the API key"), e.toString())
        }
        Unit
    }
}
