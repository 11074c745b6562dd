//! Concrete denoisers with diffusers weight names, their noise processes and samplers.
pub mod bench;
pub mod clip;
pub mod diffusers_config;
pub mod linear;
pub mod model_folder;
pub mod pipeline;
pub mod schedulers;
pub mod sd3;
pub mod shapes;
pub mod t5;
pub mod unet;
pub mod vae;
pub mod weight_file;
pub mod weights;
pub mod yolov8;
