// The screens stay with SwiftUI; the logic they draw (ios-demo/UHLMDemoCore) also builds on Linux.
#if canImport(SwiftUI)
import SwiftUI

/// Server address, certificate pin, API key (kept in the Keychain) and the model's address.
struct SettingsView: View {
    @State var settings: DemoSettings
    let onSave: (DemoSettings) -> Void

    var body: some View {
        NavigationStack {
            Form {
                TextField("Server (host:port)", text: $settings.server)
                TextField("Certificate pin (SHA-256, hex)", text: $settings.pin)
                SecureField("API key", text: $settings.apiKey)
                TextField("On-device model download address (HTTPS)", text: $settings.modelUrl)
            }
            .textInputAutocapitalization(.never)
            .autocorrectionDisabled()
            .navigationTitle("Settings")
            .toolbar { Button("Save") { onSave(settings) } }
        }
    }
}
#endif
