import Foundation
import UHLM
import XCTest

@testable import UHLMDemoCore

/// The settings between launches: `UserDefaults` for what is not secret, the secret store (the
/// Keychain on the phone) for the API key.
final class SettingsStoreTests: XCTestCase {
    private var suite: String!
    private var defaults: UserDefaults!

    override func setUp() {
        super.setUp()
        suite = "dev.uhlm.demo.tests.\(UUID().uuidString)"
        defaults = UserDefaults(suiteName: suite)
    }

    override func tearDown() {
        defaults.removePersistentDomain(forName: suite)
        super.tearDown()
    }

    func testNothingSavedYetIsTheDefaults() {
        let store = DeviceSettingsStore(defaults: defaults, secrets: InMemorySecret())
        XCTAssertEqual(store.load(), DemoSettings())
        XCTAssertEqual(store.load().mode, .uhlm)
    }

    func testSavedSettingsComeBackAndTheKeyStaysOutOfTheDefaults() {
        let secrets = InMemorySecret()
        let saved = DemoSettings(
            server: "10.0.0.2:4433", pin: String(repeating: "ab", count: 32), apiKey: "secret-key",
            mode: .hlm, modelUrl: "https://models.example/draft.gguf")
        DeviceSettingsStore(defaults: defaults, secrets: secrets).save(saved)
        // A later launch: a new store over the same defaults and secrets.
        XCTAssertEqual(DeviceSettingsStore(defaults: defaults, secrets: secrets).load(), saved)
        XCTAssertEqual(secrets.read(), "secret-key")
        let stored = defaults.persistentDomain(forName: suite) ?? [:]
        XCTAssertFalse(stored.values.contains { ($0 as? String)?.contains("secret-key") == true }, "\(stored)")
    }

    func testABlankKeyDeletesTheSecret() {
        let secrets = InMemorySecret("old-key")
        let store = DeviceSettingsStore(defaults: defaults, secrets: secrets)
        store.save(DemoSettings(apiKey: ""))
        XCTAssertNil(secrets.read())
        XCTAssertEqual(store.load().apiKey, "")
    }

    func testEveryModeIsSavedByItsName() {
        let store = DeviceSettingsStore(defaults: defaults, secrets: InMemorySecret())
        for mode in Mode.all {
            store.save(DemoSettings(mode: mode))
            XCTAssertEqual(store.load().mode, mode)
            XCTAssertEqual(Mode.named(mode.name), mode)
        }
        XCTAssertEqual(Mode.all.map(\.name), ["uhlm", "hlm", "slm", "llm"])
        XCTAssertNil(Mode.named("dense"))
        XCTAssertNil(Mode.named(nil))
    }
}
