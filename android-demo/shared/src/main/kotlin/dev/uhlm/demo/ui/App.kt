package dev.uhlm.demo.ui

import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.Surface
import androidx.compose.runtime.Composable
import androidx.compose.runtime.collectAsState
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import dev.uhlm.demo.ChatViewModel

/** The whole app: the chat screen, and the settings screen over it when opened. */
@Composable
fun App(viewModel: ChatViewModel) {
    val state by viewModel.state.collectAsState()
    var showSettings by remember { mutableStateOf(false) }
    MaterialTheme {
        Surface(color = MaterialTheme.colorScheme.background) {
            if (showSettings) {
                SettingsScreen(
                    settings = state.settings,
                    onSave = {
                        viewModel.saveSettings(it)
                        showSettings = false
                    },
                    onBack = { showSettings = false },
                )
            } else {
                ChatScreen(state, viewModel, onOpenSettings = { showSettings = true })
            }
        }
    }
}
