import SwiftUI

/// The iOS demo: the same screens as the Android and desktop app, on the UHLM Swift package.
@main
struct UHLMDemoApp: App {
    @StateObject private var chat = ChatModel(store: SettingsStore())

    var body: some Scene {
        WindowGroup {
            ChatView(chat: chat)
        }
    }
}
