package dev.uhlm.demo.desktop

import com.sun.net.httpserver.HttpServer
import dev.uhlm.demo.ModelDownloader
import java.io.File
import java.io.IOException
import java.net.InetSocketAddress
import java.nio.file.Files
import java.util.Collections
import kotlin.random.Random
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Job
import kotlinx.coroutines.async
import kotlinx.coroutines.runBlocking
import org.junit.After
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

/**
 * The phone's model download (shared code) against a loopback HTTP server: progress, the file,
 * cancellation and a server error, without a phone.
 */
class ModelDownloaderTest {
    private val body = Random(7).nextBytes(3 * 1024 * 1024)
    private val server = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0).apply {
        createContext("/model.gguf") { exchange ->
            exchange.sendResponseHeaders(200, body.size.toLong())
            exchange.responseBody.use { it.write(body) }
        }
        start()
    }
    private val url = "http://127.0.0.1:${server.address.port}"
    private val dir = Files.createTempDirectory("uhlm-download").toFile()

    @After
    fun stop() {
        server.stop(0)
        dir.deleteRecursively()
    }

    @Test
    fun `a download reports rising progress up to 1 and writes the file whole`() = runBlocking {
        val progress = Collections.synchronizedList(mutableListOf<Float?>())
        val dest = File(dir, "model.gguf")
        ModelDownloader.download("$url/model.gguf", dest) { progress += it }
        assertArrayEquals(body, dest.readBytes())
        assertTrue("progress: $progress", progress.size > 2 && progress.all { it != null })
        assertEquals(progress.sortedBy { it }, progress.toList())
        assertEquals(1f, progress.last())
        assertEquals(listOf("model.gguf"), dir.list()!!.toList())
    }

    @Test
    fun `cancelling a download leaves no file behind`() = runBlocking {
        val dest = File(dir, "model.gguf")
        lateinit var job: Job
        val download = async {
            ModelDownloader.download("$url/model.gguf", dest) { p -> if ((p ?: 0f) > 0f) job.cancel() }
        }
        job = download
        val thrown = runCatching { download.await() }.exceptionOrNull()
        assertTrue("$thrown", thrown is CancellationException)
        assertFalse(dest.exists())
        assertEquals(emptyList<String>(), dir.list()!!.toList())
    }

    @Test
    fun `a missing file is an IOException naming the status`() = runBlocking {
        val thrown = runCatching { ModelDownloader.download("$url/nope.gguf", File(dir, "nope.gguf")) {} }
            .exceptionOrNull()
        assertTrue("$thrown", thrown is IOException && thrown.message!!.contains("HTTP 404"))
    }

    @Test
    fun `a malformed address is an IOException saying so`() = runBlocking {
        val thrown = runCatching { ModelDownloader.download("not an address", File(dir, "m.gguf")) {} }
            .exceptionOrNull()
        assertTrue("$thrown", thrown is IOException && thrown.message == "not a download address: not an address")
    }
}
