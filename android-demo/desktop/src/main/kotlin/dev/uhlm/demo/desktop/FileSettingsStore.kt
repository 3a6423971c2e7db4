package dev.uhlm.demo.desktop

import dev.uhlm.Mode
import dev.uhlm.demo.DemoSettings
import dev.uhlm.demo.SettingsStore
import java.io.File
import java.nio.file.Files
import java.nio.file.attribute.PosixFilePermissions
import java.util.Properties

/**
 * The desktop's settings: a plain properties file, readable by its owner only. Unlike the
 * Android build (encrypted preferences), the API key is not encrypted here: a desktop demo
 * trusts the user's account, as a shell's `--api-key-file` does.
 */
class FileSettingsStore(
    private val file: File = File(System.getProperty("user.home"), ".config/uhlm-demo/settings.properties"),
) : SettingsStore {
    override fun load(): DemoSettings {
        if (!file.isFile) return DemoSettings()
        val p = Properties().apply { file.reader().use { load(it) } }
        val defaults = DemoSettings()
        return DemoSettings(
            server = p.getProperty("server", defaults.server),
            pin = p.getProperty("pin", defaults.pin),
            apiKey = p.getProperty("apiKey", defaults.apiKey),
            mode = p.getProperty("mode")?.let { name -> Mode.entries.find { it.name == name } } ?: defaults.mode,
            modelUrl = p.getProperty("modelUrl", defaults.modelUrl),
        )
    }

    override fun save(settings: DemoSettings) {
        file.parentFile.mkdirs()
        if (!file.exists()) {
            val ownerOnly = PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rw-------"))
            Files.createFile(file.toPath(), ownerOnly)
        }
        val p = Properties()
        p["server"] = settings.server
        p["pin"] = settings.pin
        p["apiKey"] = settings.apiKey
        p["mode"] = settings.mode.name
        p["modelUrl"] = settings.modelUrl
        file.writer().use { p.store(it, "uhlm demo settings") }
    }
}
