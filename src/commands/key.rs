//! `tierd key`: new client keys and the SHA-256 hashes that `[[client_key]]` tables hold.

use anyhow::{bail, Context};

use crate::client_keys;

/// Prints a new random key and the `[[client_key]]` table, named `name`, that accepts it. The
/// key is shown once; the config only ever holds its hash.
pub fn print_new_key(name: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    let key = client_keys::generate();
    println!("key: {key}\n");
    println!(
        "[[client_key]]\nname = {}\nsha256 = \"{}\"",
        toml_string(name),
        client_keys::hash_hex(&key)
    );
    Ok(())
}

/// Prints the SHA-256 of the key on the first line of standard input.
pub fn print_hash_of_stdin() -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("failed to read the key from standard input")?;
    let key = key.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        bail!("no key on standard input; pipe one in, as in `printf %s \"$KEY\" | tierd key hash`");
    }
    println!("{}", client_keys::hash_hex(key));
    Ok(())
}

/// Quotes `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}
