package dev.uhlm.demo.android

import android.content.Context
import android.content.SharedPreferences
import androidx.security.crypto.EncryptedSharedPreferences
import androidx.security.crypto.MasterKey
import dev.uhlm.Mode
import dev.uhlm.demo.DemoSettings
import dev.uhlm.demo.SettingsStore

/**
 * Settings in EncryptedSharedPreferences: keys and values are encrypted with an AES key held in
 * the Android Keystore, so the API key is never stored in the clear (and `allowBackup` is off).
 */
class EncryptedSettingsStore(context: Context) : SettingsStore {
    private val prefs: SharedPreferences = EncryptedSharedPreferences.create(
        context,
        "uhlm-demo-settings",
        MasterKey.Builder(context).setKeyScheme(MasterKey.KeyScheme.AES256_GCM).build(),
        EncryptedSharedPreferences.PrefKeyEncryptionScheme.AES256_SIV,
        EncryptedSharedPreferences.PrefValueEncryptionScheme.AES256_GCM,
    )

    override fun load(): DemoSettings {
        val defaults = DemoSettings()
        return DemoSettings(
            server = prefs.getString("server", null) ?: defaults.server,
            pin = prefs.getString("pin", null) ?: defaults.pin,
            apiKey = prefs.getString("apiKey", null) ?: defaults.apiKey,
            mode = prefs.getString("mode", null)?.let { name -> Mode.entries.find { it.name == name } }
                ?: defaults.mode,
            modelUrl = prefs.getString("modelUrl", null) ?: defaults.modelUrl,
        )
    }

    override fun save(settings: DemoSettings) {
        prefs.edit()
            .putString("server", settings.server)
            .putString("pin", settings.pin)
            .putString("apiKey", settings.apiKey)
            .putString("mode", settings.mode.name)
            .putString("modelUrl", settings.modelUrl)
            .apply()
    }
}
