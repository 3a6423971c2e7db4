// The screens stay with SwiftUI; the logic they draw (ios-demo/UHLMDemoCore) also builds on Linux.
#if canImport(SwiftUI)
import SwiftUI

/// The iOS demo: the same screens as the Android and desktop app, on the UHLM Swift package.
@main
struct UHLMDemoApp: App {
    @StateObject private var chat = ChatModel(store: DeviceSettingsStore(), models: DownloadedModel())

    var body: some Scene {
        WindowGroup {
            ChatView(chat: chat)
        }
    }
}
#endif
