package dev.uhlm.demo.android

import android.net.ConnectivityManager
import android.net.Network
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.viewModels
import dev.uhlm.demo.ui.App

/** The Android shell: the shared [App] screens, and network changes passed to the engine. */
class MainActivity : ComponentActivity() {
    private val viewModel: DemoViewModel by viewModels()

    /**
     * Wi-Fi ↔ cellular: the engine migrates its QUIC connection instead of waiting it out. The
     * callback also reports the current network when registered; only a different one counts.
     */
    private val network = object : ConnectivityManager.NetworkCallback() {
        @Volatile private var current: Network? = null

        override fun onAvailable(network: Network) {
            if (current != null && current != network) viewModel.chat.networkChanged()
            current = network
        }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { App(viewModel.chat) }
    }

    override fun onStart() {
        super.onStart()
        getSystemService(ConnectivityManager::class.java).registerDefaultNetworkCallback(network)
    }

    override fun onStop() {
        getSystemService(ConnectivityManager::class.java).unregisterNetworkCallback(network)
        super.onStop()
    }
}
