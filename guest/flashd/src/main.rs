fn main() -> std::process::ExitCode {
    println!("flashd: stub/placeholder — the receiver is not implemented yet; refusing to flash");
    std::process::ExitCode::FAILURE
}
