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
import org.junit.Assert.assertNotNull
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
    private fun startApp(
        mode: Mode,
        maxTokens: UInt,
        beforeGenerate: (ChatViewModel) -> Unit = {},
    ): ChatViewModel {
        val settings = DemoSettings(
            server = server.address(),
            pin = server.certFingerprint(),
            apiKey = server.apiKey(),
            mode = mode,
        )
        val options = GenerationOptions(temperature = 0.0f, maxTokens = maxTokens, chatTemplate = true)
        lateinit var vm: ChatViewModel
        vm = ChatViewModel(InMemorySettingsStore(settings), CachedDefaultModels, options) {
            beforeGenerate(vm)
        }
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
        // The real window shows the same view-model; captured before the reply, it has every
        // colour only in the legend's swatches.
        val window = openWindow(vm)
        try {
            checkReply(vm, window)
        } finally {
            SwingUtilities.invokeAndWait { window.dispose() }
        }
    }

    private fun checkReply(vm: ChatViewModel, window: ComposeWindow) {
        val before = capture(window)
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
        // A uhlm generation of 24 tokens sends some; each has a round trip to show.
        assertTrue("no token was sent", s.roundTrips > 0uL)
        assertTrue(Regex("""\d+ ms""").matches(rule.onNodeWithTag(Tags.COUNTER_RTT).text()))
        rule.onNodeWithTag(Tags.LINK).assertTextEquals("online")

        // Each source in the reply adds pixels of its colour to the window, beyond the legend's.
        val colours = summary.sources.distinct().associateWith { TokenColors.background(it).toArgb() }
        val missing = { shot: BufferedImage -> colours.filter { (_, c) -> shot.count(c) <= before.count(c) }.keys }
        val deadline = System.currentTimeMillis() + WAIT_MS
        var shot: BufferedImage
        do {
            shot = capture(window)
        } while (missing(shot).isNotEmpty() && System.currentTimeMillis() < deadline)
        save(shot)
        assertTrue("colours of ${missing(shot)} not drawn in the reply", missing(shot).isEmpty())
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
        val counters = vm.state.value.counters
        assertNotNull("counters after a cancelled generation", counters)
        assertTrue(counters!!.tokens < 400uL)
    }

    @Test
    fun `a Cancel before the generation reaches the engine is not lost`() {
        // Cancel in the instant between the Generating phase and the engine registering the
        // generation: the engine has nothing to cancel yet, so the view model repeats it.
        val vm = startApp(Mode.HLM, maxTokens = 400u, beforeGenerate = { it.cancel() })
        send("Count from 1 to 300, separated by commas.")
        vm.waitFor("the generation to end") { !it.busy && it.turns.size == 2 }
        assertEquals("generation cancelled", vm.state.value.notice)
        assertNull(lastSummary(vm.state.value))
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

    /** Shows the app in a real window (the same view-model as the test's composition). */
    private fun openWindow(vm: ChatViewModel): ComposeWindow {
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
        return window
    }

    /** The screen under [window], after it has had time to draw. */
    private fun capture(window: ComposeWindow): BufferedImage {
        val robot = Robot()
        robot.delay(500)
        return robot.createScreenCapture(Rectangle(window.locationOnScreen, window.size))
    }

    /** Saves [shot] to the `demo.screenshot` path. */
    private fun save(shot: BufferedImage) {
        val path = File(System.getProperty("demo.screenshot") ?: error("set -Ddemo.screenshot=<png path>"))
        path.parentFile.mkdirs()
        ImageIO.write(shot, "png", path)
        println("screenshot: $path")
    }

    /** Pixels of colour [argb] (alpha ignored). */
    private fun BufferedImage.count(argb: Int): Int {
        val rgb = argb and 0xFFFFFF
        var n = 0
        for (y in 0 until height) for (x in 0 until width) if (getRGB(x, y) and 0xFFFFFF == rgb) n++
        return n
    }
}
