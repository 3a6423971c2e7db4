package dev.uhlm.demo

/**
 * Where the on-device model file comes from. A phone downloads it ([DownloadedModel]); the
 * desktop build takes the default draft from the model cache. Kept behind one interface so the
 * screens show the same progress bar and Cancel on both.
 */
fun interface ModelSource {
    /**
     * Returns the path of the on-device GGUF, fetching it first if needed. [onProgress] gets the
     * fraction done (0 to 1), or null while the amount of work is unknown. Cancelling the
     * calling coroutine stops the fetch; failures throw (an [java.io.IOException] or
     * [dev.uhlm.UhlmException]) with a sentence for the user.
     */
    suspend fun prepare(settings: DemoSettings, onProgress: (Float?) -> Unit): String
}
