package dev.uhlm.demo.desktop

import androidx.compose.ui.awt.ComposeWindow
import androidx.compose.ui.graphics.toArgb
import androidx.compose.ui.test.SemanticsNodeInteraction
import androidx.compose.ui.test.assertTextEquals
import androidx.compose.ui.test.junit4.createComposeRule
import androidx.compose.ui.test.onNodeWithTag
import androidx.compose.ui.test.performClick
import androidx.compose.ui.test.performTextClearance
import androidx.compose.ui.test.performTextInput
import androidx.compose.ui.semantics.SemanticsProperties
import androidx.compose.ui.semantics.getOrNull
import dev.uhlm.DefaultModels
import dev.uhlm.EmbeddedServer
import dev.uhlm.GenerationOptions
import dev.uhlm.GenerationSummary
import dev.uhlm.Mode
import dev.uhlm.TokenSource
import dev.uhlm.demo.ChatState
import dev.uhlm.demo.ChatViewModel
import dev.uhlm.demo.DemoSettings
import dev.uhlm.demo.InMemorySettingsStore
import dev.uhlm.demo.Turn
import dev.uhlm.demo.ui.App
import dev.uhlm.demo.ui.Tags
import dev.uhlm.demo.ui.TokenColors
import dev.uhlm.ensureDefaultModels
import java.awt.Rectangle
import java.awt.Robot
import java.awt.image.BufferedImage
import java.io.File
import java.util.Locale
import javax.imageio.ImageIO
import javax.swing.SwingUtilities
import org.junit.After
import org.junit.AfterClass
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.BeforeClass
import org.junit.Rule
import org.junit.Test

/**
 * The desktop app driven through its screens, against an [EmbeddedServer] on loopback with the
 * default models (SmolLM2 and the draft derived from it), through the host libuhlm_ffi. The
 * last test opens the app in a real window (run under Xvfb: `cargo xtask test-demo`) and saves
 * a screenshot of it.
 *
 * Waits are for behaviour (a summary, a notice), with generous limits: nothing here measures
 * speed.
 */
class DesktopDemoTest {
    companion object {
        private lateinit var models: DefaultModels
        private lateinit var server: EmbeddedServer

        /** Long enough for a slow, busy machine; a hang still fails. */
        private const val WAIT_MS = 180_000L

        @BeforeClass
        @JvmStatic
        fun startServer() {
            models = ensureDefaultModels()
            server = EmbeddedServer.start(models.llmPath, null)
        }

        @AfterClass
        @JvmStatic
        fun stopServer() {
            server.stop()
            server.close()
        }
    }

    @get:Rule
    val rule = createComposeRule()

    private var viewModel: ChatViewModel? = null

    @After
    fun closeApp() {
        viewModel?.close()
    }

    /** Starts the app on the loopback server, greedy, answering with at most [maxTokens]. */
    private fun startApp(mode: Mode, maxTokens: UInt): ChatViewModel {
        val settings = DemoSettings(
            server = server.address(),
            pin = server.certFingerprint(),
            apiKey = server.apiKey(),
            mode = mode,
        )
        val options = GenerationOptions(temperature = 0.0f, maxTokens = maxTokens, chatTemplate = true)
        val vm = ChatViewModel(InMemorySettingsStore(settings), CachedDefaultModels, options)
        viewModel = vm
        rule.setContent { App(vm) }
        return vm
    }

    private fun send(prompt: String) {
        rule.onNodeWithTag(Tags.PROMPT).performTextInput(prompt)
        rule.onNodeWithTag(Tags.SEND).performClick()
    }

    private fun ChatViewModel.waitFor(what: String, condition: (ChatState) -> Boolean) =
        rule.waitUntil(what, WAIT_MS) { condition(state.value) }

    private fun SemanticsNodeInteraction.text(): String =
        fetchSemanticsNode().config.getOrNull(SemanticsProperties.Text)?.joinToString("") { it.text } ?: ""

    private fun lastSummary(state: ChatState): GenerationSummary? = (state.turns.lastOrNull() as? Turn.Reply)?.summary

    @Test
    fun `a prompt streams a coloured reply and the counters on screen match the engine`() {
        val vm = startApp(Mode.UHLM, maxTokens = 24u)
        send("Name three fruits.")
        vm.waitFor("the reply's summary or a notice") { lastSummary(it) != null || it.notice != null }
        rule.waitForIdle()
        assertNull("no error notice", vm.state.value.notice)
        val summary = lastSummary(vm.state.value)!!
        assertTrue("the model answered", summary.tokenIds.isNotEmpty())

        // The transcript: the prompt, then the reply exactly as the engine produced it.
        rule.onNodeWithTag(Tags.turn(0)).assertTextEquals("› Name three fruits.")
        rule.onNodeWithTag(Tags.turn(1)).assertTextEquals(summary.text)
        // The colours follow the engine's own record of who decided each token.
        val reply = vm.state.value.turns[1] as Turn.Reply
        assertEquals(runs(summary.sources), reply.pieces.map { it.source })

        // The counters, over the engine's only generation, are this summary's numbers.
        val s = summary.stats
        assertEquals(s.skipped + s.sent + s.offline, s.drafted)
        assertEquals(0uL, s.offline)
        rule.onNodeWithTag(Tags.COUNTER_TOKENS).assertTextEquals(summary.tokenIds.size.toString())
        val skip = 100.0 * s.skipped.toDouble() / s.decisions.toDouble()
        rule.onNodeWithTag(Tags.COUNTER_SKIP).assertTextEquals(String.format(Locale.ROOT, "%.1f %%", skip))
        rule.onNodeWithTag(Tags.COUNTER_UPLINK).assertTextEquals("${s.uplinkBytes} B")
        val saved = rule.onNodeWithTag(Tags.COUNTER_SAVED).text()
        assertTrue("uplink saved vs dense f32: $saved", Regex("""9\d\.\d %|100\.0 %""").matches(saved))
        assertTrue(Regex("""\d+\.\d""").matches(rule.onNodeWithTag(Tags.COUNTER_RATE).text()))
        if (s.roundTrips > 0uL) {
            assertTrue(Regex("""\d+ ms""").matches(rule.onNodeWithTag(Tags.COUNTER_RTT).text()))
        }
        rule.onNodeWithTag(Tags.LINK).assertTextEquals("online")

        val shot = screenshot(vm)
        val missing = summary.sources.distinct().filter { !shot.contains(TokenColors.background(it).toArgb()) }
        assertTrue("colours of $missing not in the window", missing.isEmpty())
    }

    @Test
    fun `Cancel stops a generation and says so`() {
        val vm = startApp(Mode.HLM, maxTokens = 400u)
        send("Count from 1 to 300, separated by commas.")
        vm.waitFor("a few tokens") { ((it.turns.lastOrNull() as? Turn.Reply)?.pieces?.size ?: 0) > 0 }
        rule.onNodeWithTag(Tags.CANCEL).performClick()
        vm.waitFor("the generation to end") { !it.busy && it.notice != null }
        rule.waitForIdle()
        rule.onNodeWithTag(Tags.NOTICE).assertTextEquals("generation cancelled")
        // The tokens so far stay on screen; the reply never finished.
        assertTrue(rule.onNodeWithTag(Tags.turn(1)).text().isNotEmpty())
        assertNull(lastSummary(vm.state.value))
        assertTrue((vm.state.value.counters?.tokens ?: 0uL) < 400uL)
    }

    @Test
    fun `a wrong API key typed in Settings is a readable notice`() {
        val vm = startApp(Mode.HLM, maxTokens = 8u)
        rule.onNodeWithTag(Tags.OPEN_SETTINGS).performClick()
        rule.onNodeWithTag(Tags.SETTINGS_API_KEY).performTextClearance()
        rule.onNodeWithTag(Tags.SETTINGS_API_KEY).performTextInput("not-the-key")
        rule.onNodeWithTag(Tags.SAVE_SETTINGS).performClick()
        vm.waitFor("the new key to be saved") { it.settings.apiKey == "not-the-key" }
        send("Hello")
        vm.waitFor("a notice") { !it.busy && it.notice != null }
        rule.waitForIdle()
        val notice = rule.onNodeWithTag(Tags.NOTICE).text()
        assertTrue(notice, notice.startsWith("the server rejected the API key"))
        // Only the prompt remains: no empty reply, and the app is ready for the next message.
        assertEquals(listOf(Turn.User("Hello")), vm.state.value.turns)
    }

    /** [sources] with each run of equal neighbours collapsed: the pieces the reply is drawn in. */
    private fun runs(sources: List<TokenSource>): List<TokenSource> =
        sources.filterIndexed { i, s -> i == 0 || sources[i - 1] != s }

    /**
     * Shows the app in a real window, captures the screen under it once the reply is drawn (or
     * after [WAIT_MS]), saves it to the `demo.screenshot` path and returns it.
     */
    private fun screenshot(vm: ChatViewModel): BufferedImage {
        val path = File(System.getProperty("demo.screenshot") ?: error("set -Ddemo.screenshot=<png path>"))
        lateinit var window: ComposeWindow
        SwingUtilities.invokeAndWait {
            window = ComposeWindow().apply {
                title = "uhlm demo"
                setSize(960, 720)
                setLocation(0, 0)
                setContent { App(vm) }
                isVisible = true
            }
        }
        try {
            val robot = Robot()
            val wanted = lastSummary(vm.state.value)!!.sources.distinct().map { TokenColors.background(it).toArgb() }
            val deadline = System.currentTimeMillis() + WAIT_MS
            var shot: BufferedImage
            do {
                robot.delay(500)
                shot = robot.createScreenCapture(Rectangle(window.locationOnScreen, window.size))
            } while (!wanted.all { shot.contains(it) } && System.currentTimeMillis() < deadline)
            path.parentFile.mkdirs()
            ImageIO.write(shot, "png", path)
            println("screenshot: $path")
            return shot
        } finally {
            SwingUtilities.invokeAndWait { window.dispose() }
        }
    }

    private fun BufferedImage.contains(argb: Int): Boolean {
        val rgb = argb and 0xFFFFFF
        for (y in 0 until height) for (x in 0 until width) if (getRGB(x, y) and 0xFFFFFF == rgb) return true
        return false
    }
}
