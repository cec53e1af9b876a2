// As `sqlx migrate build-script` writes it: `sqlx::migrate!` embeds the migrations at compile
// time, and cargo does not know to rebuild when one is added.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
