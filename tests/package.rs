#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The Debian package's unit (debian/ringlb.service) is the source unit
//! (systemd/ringlb.service) with the binary at /usr/bin instead of /usr/local/bin, and nothing
//! else changed: one unit to maintain. Building, installing and verifying the package itself
//! is a step of .ci/run (it needs a release build and dpkg).

use std::path::Path;

#[test]
fn the_packaged_unit_is_the_source_unit_with_the_binary_in_usr_bin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("systemd/ringlb.service")).unwrap();
    let packaged = std::fs::read_to_string(root.join("debian/ringlb.service")).unwrap();
    assert!(source.contains("/usr/local/bin/ringlb"));
    assert_eq!(
        packaged,
        source.replace("/usr/local/bin/ringlb", "/usr/bin/ringlb"),
        "regenerate it: sed 's|/usr/local/bin/ringlb|/usr/bin/ringlb|g' systemd/ringlb.service > debian/ringlb.service"
    );
    // The package metadata names the paths the unit uses.
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(cargo.contains("[\"target/release/ringlb\", \"usr/bin/\", \"755\"]"));
    assert!(cargo.contains("[\"config/ringlb.toml\", \"etc/ringlb/ringlb.toml\", \"644\"]"));
}
