// swift-tools-version:5.9
// uhlm for Swift: the uniffi-generated bindings (Sources/UHLM/Generated, written by
// `cargo xtask bindgen`), the async layer (Sources/UHLM/UhlmEngine.swift), and the Rust library
// as UHLMFFI.xcframework (built by `cargo xtask ios` on macOS with Xcode).
import PackageDescription

let package = Package(
    name: "UHLM",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "UHLM", targets: ["UHLM"]),
    ],
    targets: [
        .binaryTarget(name: "UHLMFFI", path: "UHLMFFI.xcframework"),
        .target(name: "UHLM", dependencies: ["UHLMFFI"], path: "Sources/UHLM"),
        .testTarget(name: "UHLMTests", dependencies: ["UHLM"], path: "Tests/UHLMTests"),
    ]
)
