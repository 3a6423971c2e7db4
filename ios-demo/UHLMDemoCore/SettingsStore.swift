import Foundation
import UHLM

#if canImport(Security)
import Security
#endif

/// What the user sets: server, certificate pin, API key, mode, and where the on-device model is
/// downloaded from. Blank server and pin mean "none" (only `.slm` works without a server).
struct DemoSettings: Equatable {
    var server = ""
    var pin = ""
    var apiKey = ""
    var mode: Mode = .uhlm
    var modelUrl = ""
}

/// Where the settings live between launches (the Kotlin app's `SettingsStore`).
protocol SettingsStore {
    func load() -> DemoSettings
    func save(_ settings: DemoSettings)
}

/// Where the API key lives: a secret, kept apart from the other settings.
protocol SecretStore {
    func read() -> String?
    /// Stores `value`; an empty one deletes the secret.
    func write(_ value: String)
}

/// Settings between launches: the API key in `secrets` (the Keychain on the phone), the rest
/// in `UserDefaults`, where nothing secret goes.
struct DeviceSettingsStore: SettingsStore {
    private let defaults: UserDefaults
    private let secrets: SecretStore

    init(defaults: UserDefaults, secrets: SecretStore) {
        self.defaults = defaults
        self.secrets = secrets
    }

    #if canImport(Security)
    /// The app's store: `UserDefaults.standard` and the Keychain.
    init() {
        self.init(defaults: .standard, secrets: KeychainSecret(service: "dev.uhlm.demo", account: "api-key"))
    }
    #endif

    func load() -> DemoSettings {
        DemoSettings(
            server: defaults.string(forKey: "server") ?? "",
            pin: defaults.string(forKey: "pin") ?? "",
            apiKey: secrets.read() ?? "",
            mode: Mode.named(defaults.string(forKey: "mode")) ?? .uhlm,
            modelUrl: defaults.string(forKey: "modelUrl") ?? ""
        )
    }

    func save(_ settings: DemoSettings) {
        defaults.set(settings.server, forKey: "server")
        defaults.set(settings.pin, forKey: "pin")
        defaults.set(settings.mode.name, forKey: "mode")
        defaults.set(settings.modelUrl, forKey: "modelUrl")
        secrets.write(settings.apiKey)
    }
}

#if canImport(Security)
/// A generic password in the Keychain, readable on this device only, after its first unlock.
struct KeychainSecret: SecretStore {
    let service: String
    let account: String

    private var query: [String: Any] {
        [kSecClass as String: kSecClassGenericPassword,
         kSecAttrService as String: service,
         kSecAttrAccount as String: account]
    }

    func read() -> String? {
        var q = query
        q[kSecReturnData as String] = true
        q[kSecMatchLimit as String] = kSecMatchLimitOne
        var item: CFTypeRef?
        guard SecItemCopyMatching(q as CFDictionary, &item) == errSecSuccess,
              let data = item as? Data else { return nil }
        return String(data: data, encoding: .utf8)
    }

    func write(_ value: String) {
        SecItemDelete(query as CFDictionary)
        guard !value.isEmpty else { return }
        var q = query
        q[kSecValueData as String] = Data(value.utf8)
        q[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        SecItemAdd(q as CFDictionary, nil)
    }
}
#endif

/// A secret held in memory only: for tests, and where there is no Keychain (Linux).
final class InMemorySecret: SecretStore, @unchecked Sendable {
    private let lock = NSLock()
    private var value: String?

    init(_ value: String? = nil) { self.value = value }

    func read() -> String? {
        lock.lock()
        defer { lock.unlock() }
        return value
    }

    func write(_ value: String) {
        lock.lock()
        self.value = value.isEmpty ? nil : value
        lock.unlock()
    }
}

/// Settings held in memory only (tests; the Kotlin app's `InMemorySettingsStore`).
final class InMemorySettingsStore: SettingsStore, @unchecked Sendable {
    private let lock = NSLock()
    private var settings: DemoSettings

    init(_ settings: DemoSettings = DemoSettings()) { self.settings = settings }

    func load() -> DemoSettings {
        lock.lock()
        defer { lock.unlock() }
        return settings
    }

    func save(_ settings: DemoSettings) {
        lock.lock()
        self.settings = settings
        lock.unlock()
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
