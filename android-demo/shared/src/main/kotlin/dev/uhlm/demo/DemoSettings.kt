package dev.uhlm.demo

import dev.uhlm.Mode

/**
 * What the user sets on the settings screen: where the server is, how to trust it, the key it
 * expects, who decides the tokens, and (Android) where the on-device model is downloaded from.
 * Blank [server] and [pin] mean "none": only [Mode.SLM] works without a server.
 */
data class DemoSettings(
    val server: String = "",
    /** Lowercase hex SHA-256 of the server's certificate (`uhlm-server` prints it). */
    val pin: String = "",
    val apiKey: String = "",
    val mode: Mode = Mode.UHLM,
    /** HTTPS address of the on-device GGUF (a draft derived from the server's model). */
    val modelUrl: String = "",
)

/**
 * Where settings survive a restart. Each platform brings its own: the API key is a secret, so
 * Android keeps it in encrypted storage; the desktop build keeps a plain local file.
 */
interface SettingsStore {
    fun load(): DemoSettings

    fun save(settings: DemoSettings)
}

/** Settings that last as long as the process: tests, and a desktop run on its own server. */
class InMemorySettingsStore(private var settings: DemoSettings = DemoSettings()) : SettingsStore {
    override fun load(): DemoSettings = settings

    override fun save(settings: DemoSettings) {
        this.settings = settings
    }
}
