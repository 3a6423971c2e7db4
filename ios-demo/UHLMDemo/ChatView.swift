// The screens stay with SwiftUI; the logic they draw (ios-demo/UHLMDemoCore) also builds on Linux.
#if canImport(SwiftUI)
import SwiftUI
import UHLM

/// The chat: mode switch and link state, model progress, counters, the transcript coloured by
/// who decided each token, and the prompt with Send and Cancel.
struct ChatView: View {
    @ObservedObject var chat: ChatModel
    @State private var prompt = ""
    @State private var showSettings = false

    var body: some View {
        NavigationStack {
            VStack(alignment: .leading, spacing: 8) {
                Picker("Mode", selection: Binding(
                    get: { chat.settings.mode },
                    set: { mode in var s = chat.settings; s.mode = mode; chat.save(s) })) {
                    ForEach(Mode.all, id: \.self) { Text($0.name).tag($0) }
                }
                .pickerStyle(.segmented)
                .disabled(chat.busy)
                progress
                counters
                legend
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 8) {
                        ForEach(chat.turns) { turn in row(turn) }
                    }
                }
                if let notice = chat.notice {
                    Text(notice).foregroundStyle(.red).font(.callout)
                }
                HStack {
                    TextField("Ask something", text: $prompt).textFieldStyle(.roundedBorder)
                    Button("Send") { chat.send(prompt); prompt = "" }.disabled(chat.busy || prompt.isEmpty)
                    Button("Cancel", role: .cancel) { chat.cancel() }.disabled(!chat.busy)
                }
            }
            .padding()
            .navigationTitle("uhlm")
            .toolbar {
                ToolbarItem(placement: .principal) { link }
                ToolbarItem(placement: .primaryAction) {
                    Button("Settings") { showSettings = true }.disabled(chat.busy)
                }
            }
            .sheet(isPresented: $showSettings) {
                SettingsView(settings: chat.settings) { chat.save($0); showSettings = false }
            }
        }
    }

    private var link: some View {
        Group {
            if chat.settings.mode == .slm {
                Text("on device only").foregroundStyle(.secondary)
            } else if let link = chat.online {
                Text(link.0 ? "online" : "offline: \(link.1)").foregroundStyle(link.0 ? .green : .red)
            } else {
                Text("server: not contacted yet").foregroundStyle(.secondary)
            }
        }
        .font(.caption)
    }

    @ViewBuilder private var progress: some View {
        switch chat.phase {
        case .preparingModel(let p):
            if let p { ProgressView("Downloading the on-device model", value: p) } else { ProgressView("Downloading the on-device model") }
        case .loadingEngine(let p):
            ProgressView("Loading the on-device model", value: p)
        default:
            EmptyView()
        }
    }

    private var counters: some View {
        let c = chat.counters
        return HStack {
            counter("tokens", c?.tokens)
            counter("on device", c?.onDevice)
            counter("uplink", c?.uplink)
            counter("saved vs dense", c?.saved)
            counter("tok/s", c?.tokensPerSecond)
            counter("RTT", c?.roundTrip)
        }
    }

    private func counter(_ label: String, _ value: String?) -> some View {
        VStack(alignment: .leading) {
            Text(value ?? "–").font(.headline.monospacedDigit())
            Text(label).font(.caption2).foregroundStyle(.secondary)
        }
        .frame(maxWidth: .infinity, alignment: .leading)
    }

    private var legend: some View {
        HStack(spacing: 10) {
            ForEach([TokenSource.local, .accepted, .resampled, .remote, .offline], id: \.self) { source in
                HStack(spacing: 4) {
                    RoundedRectangle(cornerRadius: 3).fill(TokenStyle.color(source)).frame(width: 12, height: 12)
                    Text(TokenStyle.label(source)).font(.caption2)
                }
            }
        }
    }

    @ViewBuilder private func row(_ turn: Turn) -> some View {
        switch turn {
        case .user(_, let text):
            Text("› \(text)").foregroundStyle(.tint)
        case .reply(_, let pieces, let summary):
            VStack(alignment: .leading, spacing: 2) {
                Text(pieces.reduce(AttributedString()) { text, piece in
                    var run = AttributedString(piece.text)
                    run.backgroundColor = TokenStyle.color(piece.source)
                    return text + run
                })
                if let summary {
                    Text("\(summary.tokenIds.count) tokens").font(.caption2).foregroundStyle(.secondary)
                }
            }
        }
    }
}

/// Who decided each token, as the background behind its text (the Kotlin app's colours).
enum TokenStyle {
    static func color(_ source: TokenSource) -> Color {
        switch source {
        case .local: return Color(red: 0.78, green: 0.92, blue: 0.81)
        case .accepted: return Color(red: 0.79, green: 0.86, blue: 0.97)
        case .resampled: return Color(red: 1.0, green: 0.83, blue: 0.65)
        case .remote: return Color(red: 0.89, green: 0.83, blue: 0.95)
        case .offline: return Color(white: 0.85)
        }
    }

    static func label(_ source: TokenSource) -> String {
        switch source {
        case .local: return "device"
        case .accepted: return "server accepted"
        case .resampled: return "server resampled"
        case .remote: return "server"
        case .offline: return "offline"
        }
    }
}
#endif
