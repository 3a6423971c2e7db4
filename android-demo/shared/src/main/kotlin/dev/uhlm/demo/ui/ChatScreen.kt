package dev.uhlm.demo.ui

import androidx.compose.foundation.background
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Box
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.RowScope
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.size
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.shape.RoundedCornerShape
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.FilterChip
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Surface
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.platform.testTag
import androidx.compose.ui.text.SpanStyle
import androidx.compose.ui.text.buildAnnotatedString
import androidx.compose.ui.text.withStyle
import androidx.compose.ui.unit.dp
import dev.uhlm.Mode
import dev.uhlm.TokenSource
import dev.uhlm.demo.ChatState
import dev.uhlm.demo.ChatViewModel
import dev.uhlm.demo.CounterText
import dev.uhlm.demo.Phase
import dev.uhlm.demo.Turn

/**
 * The chat: mode switch and link state on top, the model's progress, the counters, the
 * transcript with each token coloured by who decided it, and the prompt with Send and Cancel.
 */
@Composable
fun ChatScreen(state: ChatState, viewModel: ChatViewModel, onOpenSettings: () -> Unit) {
    Column(Modifier.fillMaxSize().padding(12.dp), verticalArrangement = Arrangement.spacedBy(8.dp)) {
        Row(verticalAlignment = Alignment.CenterVertically) {
            Text("uhlm", style = MaterialTheme.typography.titleLarge)
            Spacer(Modifier.width(12.dp))
            LinkIndicator(state)
            Spacer(Modifier.weight(1f))
            TextButton(
                onClick = onOpenSettings,
                enabled = !state.busy,
                modifier = Modifier.testTag(Tags.OPEN_SETTINGS),
            ) { Text("Settings") }
        }
        ModeSwitch(state.settings.mode, enabled = !state.busy, onSelect = viewModel::setMode)
        ModelBar(state, onPrepare = viewModel::prepareModel)
        CountersRow(state)
        Legend()
        Transcript(state.turns, Modifier.weight(1f).fillMaxWidth())
        state.notice?.let { Notice(it, onDismiss = viewModel::dismissNotice) }
        PromptBar(busy = state.busy, onSend = viewModel::send, onCancel = viewModel::cancel)
    }
}

@Composable
private fun LinkIndicator(state: ChatState) {
    val link = state.link
    val (text, color) = when {
        state.settings.mode == Mode.SLM -> "on device only" to MaterialTheme.colorScheme.outline
        link == null -> "server: not contacted yet" to MaterialTheme.colorScheme.outline
        link.online -> "online" to MaterialTheme.colorScheme.primary
        else -> "offline: ${link.detail}" to MaterialTheme.colorScheme.error
    }
    Text(text, color = color, style = MaterialTheme.typography.labelLarge, modifier = Modifier.testTag(Tags.LINK))
}

@Composable
private fun ModeSwitch(mode: Mode, enabled: Boolean, onSelect: (Mode) -> Unit) {
    Row(horizontalArrangement = Arrangement.spacedBy(6.dp), verticalAlignment = Alignment.CenterVertically) {
        Text("Mode", style = MaterialTheme.typography.labelLarge)
        for (m in Mode.entries) {
            val name = m.name.lowercase()
            FilterChip(
                selected = m == mode,
                onClick = { onSelect(m) },
                enabled = enabled,
                label = { Text(name) },
                modifier = Modifier.testTag(Tags.mode(name)),
            )
        }
    }
}

@Composable
private fun ModelBar(state: ChatState, onPrepare: () -> Unit) {
    when (val phase = state.phase) {
        is Phase.PreparingModel -> Progress("Fetching the on-device model", phase.progress)
        is Phase.LoadingEngine -> Progress("Loading the on-device model", phase.progress)
        else -> if (state.modelPath == null) {
            Row(verticalAlignment = Alignment.CenterVertically) {
                Text("On-device model: not fetched yet", Modifier.weight(1f))
                OutlinedButton(
                    onClick = onPrepare,
                    enabled = !state.busy,
                    modifier = Modifier.testTag(Tags.PREPARE_MODEL),
                ) { Text("Download model") }
            }
        }
    }
}

@Composable
private fun Progress(label: String, progress: Float?) {
    Column(Modifier.fillMaxWidth()) {
        val percent = progress?.let { " ${(it * 100).toInt()} %" } ?: ""
        Text(label + percent, style = MaterialTheme.typography.labelMedium)
        val bar = Modifier.fillMaxWidth().testTag(Tags.MODEL_PROGRESS)
        if (progress == null) {
            LinearProgressIndicator(bar)
        } else {
            LinearProgressIndicator(progress = { progress }, modifier = bar)
        }
    }
}

@Composable
private fun CountersRow(state: ChatState) {
    val c = state.counters
    Row(Modifier.fillMaxWidth(), horizontalArrangement = Arrangement.spacedBy(8.dp)) {
        Counter("tokens", c?.tokens?.toString(), Tags.COUNTER_TOKENS)
        Counter("decided on device", c?.let { CounterText.percent(it.skipRate) }, Tags.COUNTER_SKIP)
        Counter("uplink", c?.let { CounterText.bytes(it.uplinkBytes) }, Tags.COUNTER_UPLINK)
        Counter("uplink saved vs dense", c?.let { CounterText.percent(it.uplinkSaved) }, Tags.COUNTER_SAVED)
        Counter("tokens/s", c?.let { CounterText.rate(it.tokensPerSecond) }, Tags.COUNTER_RATE)
        Counter("round trip", c?.let { CounterText.millis(it.rttMs) }, Tags.COUNTER_RTT)
    }
}

@Composable
private fun RowScope.Counter(label: String, value: String?, tag: String) {
    Surface(
        Modifier.weight(1f),
        shape = RoundedCornerShape(8.dp),
        color = MaterialTheme.colorScheme.surfaceVariant,
    ) {
        Column(Modifier.padding(8.dp)) {
            Text(value ?: "–", style = MaterialTheme.typography.titleMedium, modifier = Modifier.testTag(tag))
            Text(label, style = MaterialTheme.typography.labelSmall)
        }
    }
}

@Composable
private fun Legend() {
    Row(horizontalArrangement = Arrangement.spacedBy(12.dp), verticalAlignment = Alignment.CenterVertically) {
        for (source in TokenSource.entries) {
            Row(verticalAlignment = Alignment.CenterVertically) {
                Box(Modifier.size(12.dp).background(TokenColors.background(source), RoundedCornerShape(3.dp)))
                Spacer(Modifier.width(4.dp))
                Text(TokenColors.label(source), style = MaterialTheme.typography.labelMedium)
            }
        }
    }
}

@Composable
private fun Transcript(turns: List<Turn>, modifier: Modifier) {
    val scroll = rememberScrollState()
    val last = turns.lastOrNull()
    LaunchedEffect(turns.size, (last as? Turn.Reply)?.text?.length) { scroll.animateScrollTo(scroll.maxValue) }
    Column(modifier.verticalScroll(scroll), verticalArrangement = Arrangement.spacedBy(8.dp)) {
        turns.forEachIndexed { index, turn ->
            when (turn) {
                is Turn.User -> Text(
                    "› ${turn.text}",
                    style = MaterialTheme.typography.bodyLarge,
                    color = MaterialTheme.colorScheme.primary,
                    modifier = Modifier.testTag(Tags.turn(index)),
                )
                is Turn.Reply -> Reply(turn, Modifier.testTag(Tags.turn(index)))
            }
        }
    }
}

@Composable
private fun Reply(reply: Turn.Reply, modifier: Modifier) {
    Column {
        val text = buildAnnotatedString {
            for (piece in reply.pieces) {
                withStyle(SpanStyle(background = TokenColors.background(piece.source))) { append(piece.text) }
            }
        }
        Text(text, style = MaterialTheme.typography.bodyLarge, modifier = modifier)
        reply.summary?.let { s ->
            Text(
                "${s.tokenIds.size} tokens · ended by ${s.stop.name.lowercase().replace('_', ' ')}",
                style = MaterialTheme.typography.labelSmall,
                color = MaterialTheme.colorScheme.outline,
            )
        }
    }
}

@Composable
private fun Notice(text: String, onDismiss: () -> Unit) {
    Surface(color = MaterialTheme.colorScheme.errorContainer, shape = RoundedCornerShape(8.dp)) {
        Row(Modifier.fillMaxWidth().padding(horizontal = 12.dp), verticalAlignment = Alignment.CenterVertically) {
            Text(
                text,
                color = MaterialTheme.colorScheme.onErrorContainer,
                modifier = Modifier.weight(1f).testTag(Tags.NOTICE),
            )
            TextButton(onClick = onDismiss) { Text("Dismiss") }
        }
    }
}

@Composable
private fun PromptBar(busy: Boolean, onSend: (String) -> Unit, onCancel: () -> Unit) {
    var prompt by remember { mutableStateOf("") }
    Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
        OutlinedTextField(
            value = prompt,
            onValueChange = { prompt = it },
            placeholder = { Text("Ask something") },
            singleLine = true,
            modifier = Modifier.weight(1f).testTag(Tags.PROMPT),
        )
        Button(
            onClick = {
                onSend(prompt)
                prompt = ""
            },
            enabled = !busy && prompt.isNotBlank(),
            modifier = Modifier.testTag(Tags.SEND),
        ) { Text("Send") }
        OutlinedButton(onClick = onCancel, enabled = busy, modifier = Modifier.testTag(Tags.CANCEL)) { Text("Cancel") }
    }
}
