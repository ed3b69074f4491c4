import ArgumentParser
import FlotillaCLI

@main
enum Entry {
    static func main() async {
        await Flotilla.main()
    }
}
