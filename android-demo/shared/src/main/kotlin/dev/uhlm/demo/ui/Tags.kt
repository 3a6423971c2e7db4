package dev.uhlm.demo.ui

/** Test tags of the nodes a UI test reads or clicks (Compose `Modifier.testTag`). */
object Tags {
    const val PROMPT = "prompt"
    const val SEND = "send"
    const val CANCEL = "cancel"
    const val NOTICE = "notice"
    const val LINK = "link"
    const val MODEL_PROGRESS = "model-progress"
    const val PREPARE_MODEL = "prepare-model"
    const val OPEN_SETTINGS = "open-settings"
    const val SAVE_SETTINGS = "save-settings"
    const val SETTINGS_SERVER = "settings-server"
    const val SETTINGS_PIN = "settings-pin"
    const val SETTINGS_API_KEY = "settings-api-key"
    const val SETTINGS_MODEL_URL = "settings-model-url"
    const val COUNTER_TOKENS = "counter-tokens"
    const val COUNTER_SKIP = "counter-skip"
    const val COUNTER_UPLINK = "counter-uplink"
    const val COUNTER_SAVED = "counter-saved"
    const val COUNTER_RATE = "counter-rate"
    const val COUNTER_RTT = "counter-rtt"

    fun mode(name: String) = "mode-$name"

    /** The reply at [index] in the transcript (counting every turn). */
    fun turn(index: Int) = "turn-$index"
}
