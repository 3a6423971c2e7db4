package dev.uhlm.demo.android

import android.app.Application
import androidx.lifecycle.AndroidViewModel
import dev.uhlm.demo.ChatViewModel
import dev.uhlm.demo.DownloadedModel
import java.io.File

/**
 * Keeps the shared [ChatViewModel] (and with it the loaded model and any generation) alive
 * across rotations; releases the model when the activity is finished for good.
 */
class DemoViewModel(app: Application) : AndroidViewModel(app) {
    val chat = ChatViewModel(
        store = EncryptedSettingsStore(app),
        models = DownloadedModel(File(app.filesDir, "models")),
    )

    override fun onCleared() = chat.close()
}
