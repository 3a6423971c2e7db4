// The Android shell of the demo: open this folder (android-demo/) in Android Studio. The uhlm
// Android library (bindings/kotlin/android: the Kotlin bindings plus libuhlm_ffi.so for each ABI,
// from `cargo xtask android`) joins as an included build, so its AAR is built with the app.
// The desktop build next to it (desktop/) is Maven's and is not part of this Gradle build.
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

rootProject.name = "uhlm-demo"
include(":app")

includeBuild("../bindings/kotlin/android") {
    dependencySubstitution {
        substitute(module("dev.uhlm:uhlm-android")).using(project(":"))
    }
}
