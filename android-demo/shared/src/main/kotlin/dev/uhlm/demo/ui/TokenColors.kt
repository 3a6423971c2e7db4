package dev.uhlm.demo.ui

import androidx.compose.ui.graphics.Color
import dev.uhlm.TokenSource

/**
 * Who decided each token, as the background behind its text. Opaque pastel fills keep the text
 * readable in one colour and make every source easy to tell apart (and to find in a screenshot).
 */
object TokenColors {
    fun background(source: TokenSource): Color = when (source) {
        TokenSource.LOCAL -> Color(0xFFC8EBCF)
        TokenSource.ACCEPTED -> Color(0xFFC9DCF8)
        TokenSource.RESAMPLED -> Color(0xFFFFD3A6)
        TokenSource.REMOTE -> Color(0xFFE2D3F3)
        TokenSource.OFFLINE -> Color(0xFFDADADA)
    }

    fun label(source: TokenSource): String = when (source) {
        TokenSource.LOCAL -> "device"
        TokenSource.ACCEPTED -> "server accepted"
        TokenSource.RESAMPLED -> "server resampled"
        TokenSource.REMOTE -> "server"
        TokenSource.OFFLINE -> "offline"
    }
}
