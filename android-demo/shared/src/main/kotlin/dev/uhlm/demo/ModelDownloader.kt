package dev.uhlm.demo

import java.io.File
import java.io.IOException
import java.net.HttpURLConnection
import java.net.URI
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.withContext

/**
 * Downloads a file over HTTP(S) with progress and cancellation, for the on-device model on a
 * phone (plain `java.net`, so it runs on Android and the JVM alike).
 *
 * Writes to `<dest>.part` and renames it only when complete, so a cancelled or failed download
 * never leaves a truncated model where the engine would load it.
 */
object ModelDownloader {
    private const val BUFFER_BYTES = 256 * 1024

    /**
     * Downloads [url] to [dest] on [Dispatchers.IO], telling [onProgress] the fraction received
     * (null when the server sends no length). Cancelling the coroutine stops between buffers and
     * deletes the partial file.
     */
    suspend fun download(url: String, dest: File, onProgress: (Float?) -> Unit) =
        withContext(Dispatchers.IO) {
            val part = File(dest.path + ".part")
            dest.parentFile?.mkdirs()
            val address = runCatching { URI(url).toURL() }
                .getOrElse { throw IOException("not a download address: $url") }
            val connection = address.openConnection() as HttpURLConnection
            try {
                connection.connectTimeout = 15_000
                connection.readTimeout = 30_000
                val code = connection.responseCode
                if (code != HttpURLConnection.HTTP_OK) {
                    throw IOException("downloading $url: the server answered HTTP $code")
                }
                val total = connection.contentLengthLong.takeIf { it > 0 }
                var received = 0L
                onProgress(total?.let { 0f })
                connection.inputStream.use { input ->
                    part.outputStream().use { output ->
                        val buffer = ByteArray(BUFFER_BYTES)
                        while (true) {
                            ensureActive()
                            val n = input.read(buffer)
                            if (n < 0) break
                            output.write(buffer, 0, n)
                            received += n
                            onProgress(total?.let { (received.toFloat() / it).coerceAtMost(1f) })
                        }
                    }
                }
                if (total != null && received != total) {
                    throw IOException("downloading $url: got $received of $total bytes")
                }
                if (!part.renameTo(dest)) throw IOException("cannot move the download to $dest")
                onProgress(1f)
            } finally {
                connection.disconnect()
                part.delete()
            }
        }
}

/**
 * The phone's [ModelSource]: the GGUF at [DemoSettings.modelUrl], downloaded once into [dir]
 * under the URL's file name and reused while that file exists.
 */
class DownloadedModel(private val dir: File) : ModelSource {
    override suspend fun prepare(settings: DemoSettings, onProgress: (Float?) -> Unit): String {
        val url = settings.modelUrl.trim()
        if (url.isEmpty()) throw IOException("set the model's download address in Settings")
        val name = url.substringAfterLast('/').substringBefore('?').ifEmpty { "model.gguf" }
        val file = File(dir, name)
        if (!file.isFile) ModelDownloader.download(url, file, onProgress)
        return file.path
    }
}
