import Foundation
import Security
import UHLM

/// What the user sets: server, certificate pin, API key, mode, and where the on-device model is
/// downloaded from. Blank server and pin mean "none" (only `.slm` works without a server).
struct DemoSettings: Equatable {
    var server = ""
    var pin = ""
    var apiKey = ""
    var mode: Mode = .uhlm
    var modelUrl = ""
}

/// Settings between launches: the API key in the Keychain (this device only, after first
/// unlock), the rest in `UserDefaults`, where nothing secret goes.
struct SettingsStore {
    private let defaults = UserDefaults.standard
    private let service = "dev.uhlm.demo"
    private let keyAccount = "api-key"

    func load() -> DemoSettings {
        DemoSettings(
            server: defaults.string(forKey: "server") ?? "",
            pin: defaults.string(forKey: "pin") ?? "",
            apiKey: readKey() ?? "",
            mode: Mode.named(defaults.string(forKey: "mode")) ?? .uhlm,
            modelUrl: defaults.string(forKey: "modelUrl") ?? ""
        )
    }

    func save(_ settings: DemoSettings) {
        defaults.set(settings.server, forKey: "server")
        defaults.set(settings.pin, forKey: "pin")
        defaults.set(settings.mode.name, forKey: "mode")
        defaults.set(settings.modelUrl, forKey: "modelUrl")
        writeKey(settings.apiKey)
    }

    private var query: [String: Any] {
        [kSecClass as String: kSecClassGenericPassword,
         kSecAttrService as String: service,
         kSecAttrAccount as String: keyAccount]
    }

    private func readKey() -> String? {
        var q = query
        q[kSecReturnData as String] = true
        q[kSecMatchLimit as String] = kSecMatchLimitOne
        var item: CFTypeRef?
        guard SecItemCopyMatching(q as CFDictionary, &item) == errSecSuccess,
              let data = item as? Data else { return nil }
        return String(data: data, encoding: .utf8)
    }

    private func writeKey(_ key: String) {
        SecItemDelete(query as CFDictionary)
        guard !key.isEmpty else { return }
        var q = query
        q[kSecValueData as String] = Data(key.utf8)
        q[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        SecItemAdd(q as CFDictionary, nil)
    }
}

extension Mode {
    static let all: [Mode] = [.uhlm, .hlm, .slm, .llm]

    var name: String {
        switch self {
        case .uhlm: return "uhlm"
        case .hlm: return "hlm"
        case .slm: return "slm"
        case .llm: return "llm"
        }
    }

    static func named(_ name: String?) -> Mode? { all.first { $0.name == name } }
}
