// The uhlm Android library (AAR). Needs the Android SDK; build the native libraries first with
// `cargo xtask android` (cargo-ndk + the NDK), then `gradle assembleRelease` here.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "uhlm-android"
