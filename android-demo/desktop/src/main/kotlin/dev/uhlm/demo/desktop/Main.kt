package dev.uhlm.demo.desktop

import androidx.compose.ui.unit.dp
import androidx.compose.ui.window.Window
import androidx.compose.ui.window.application
import androidx.compose.ui.window.rememberWindowState
import dev.uhlm.EmbeddedServer
import dev.uhlm.demo.ChatViewModel
import dev.uhlm.demo.DemoSettings
import dev.uhlm.demo.InMemorySettingsStore
import dev.uhlm.demo.SettingsStore
import dev.uhlm.demo.ui.App
import dev.uhlm.ensureDefaultModels

/**
 * The desktop demo. `--embedded-server` first starts a loopback server on the default LLM
 * (fresh certificate and key, filled into the settings for this run only), so the whole hybrid
 * loop runs on one machine; without it the app talks to the server saved in its settings file.
 */
fun main(args: Array<String>) {
    val embedded = "--embedded-server" in args
    val server = if (embedded) EmbeddedServer.start(ensureDefaultModels().llmPath, null) else null
    val store: SettingsStore = if (server != null) {
        val local = DemoSettings(server = server.address(), pin = server.certFingerprint(), apiKey = server.apiKey())
        InMemorySettingsStore(local)
    } else {
        FileSettingsStore()
    }
    val viewModel = ChatViewModel(store, CachedDefaultModels)
    try {
        // Returns when the window closes (instead of exiting the JVM), so the cleanup below runs.
        application(exitProcessOnExit = false) {
            Window(
                onCloseRequest = ::exitApplication,
                title = "uhlm demo",
                state = rememberWindowState(width = 960.dp, height = 720.dp),
            ) {
                App(viewModel)
            }
        }
    } finally {
        viewModel.close()
        server?.stop()
    }
}
