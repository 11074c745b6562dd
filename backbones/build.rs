include!("../build-support/link_torch.rs");

fn main() {
    link_torch();
}
