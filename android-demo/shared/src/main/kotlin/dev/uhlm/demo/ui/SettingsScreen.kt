package dev.uhlm.demo.ui

import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.material3.Button
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.platform.testTag
import androidx.compose.ui.text.input.PasswordVisualTransformation
import androidx.compose.ui.text.input.VisualTransformation
import androidx.compose.ui.unit.dp
import dev.uhlm.demo.DemoSettings

/** Server address, certificate pin, API key (hidden as typed) and the model's download address. */
@Composable
fun SettingsScreen(settings: DemoSettings, onSave: (DemoSettings) -> Unit, onBack: () -> Unit) {
    var server by remember { mutableStateOf(settings.server) }
    var pin by remember { mutableStateOf(settings.pin) }
    var apiKey by remember { mutableStateOf(settings.apiKey) }
    var modelUrl by remember { mutableStateOf(settings.modelUrl) }
    Column(Modifier.fillMaxSize().padding(16.dp), verticalArrangement = Arrangement.spacedBy(12.dp)) {
        Text("Settings", style = MaterialTheme.typography.titleLarge)
        Field("Server (host:port)", server, Tags.SETTINGS_SERVER) { server = it }
        Field("Certificate pin (SHA-256, hex)", pin, Tags.SETTINGS_PIN) { pin = it }
        Field("API key", apiKey, Tags.SETTINGS_API_KEY, secret = true) { apiKey = it }
        Field("On-device model download address (HTTPS)", modelUrl, Tags.SETTINGS_MODEL_URL) { modelUrl = it }
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(
                onClick = { onSave(settings.copy(server = server, pin = pin, apiKey = apiKey, modelUrl = modelUrl)) },
                modifier = Modifier.testTag(Tags.SAVE_SETTINGS),
            ) { Text("Save") }
            TextButton(onClick = onBack) { Text("Back") }
        }
    }
}

@Composable
private fun Field(label: String, value: String, tag: String, secret: Boolean = false, onChange: (String) -> Unit) {
    OutlinedTextField(
        value = value,
        onValueChange = onChange,
        label = { Text(label) },
        singleLine = true,
        visualTransformation = if (secret) PasswordVisualTransformation() else VisualTransformation.None,
        modifier = Modifier.fillMaxWidth().testTag(tag),
    )
}
