package dev.uhlm.demo.desktop

import dev.uhlm.demo.DemoSettings
import dev.uhlm.demo.ModelSource
import dev.uhlm.ensureDefaultModels
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.withContext

/**
 * The desktop's on-device model: the default draft from the model cache, derived from the
 * cached SmolLM2 on first use (`ensureDefaultModels`, seconds; `uhlm models fetch smollm2`
 * fills the cache). Its progress is unknown, so the bar is indeterminate; Cancel abandons the
 * wait, though the call itself runs to its end.
 */
object CachedDefaultModels : ModelSource {
    override suspend fun prepare(settings: DemoSettings, onProgress: (Float?) -> Unit): String {
        onProgress(null)
        return withContext(Dispatchers.IO) { ensureDefaultModels().slmPath }
    }
}
