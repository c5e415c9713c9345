//! What a module's parameters are: their paths, shapes and whether their
//! values are finite. Used to check weights loaded from a file against the
//! model they are meant for, before anything computes with them.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

/// One float parameter of a module.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// Its path in the module, e.g. `stem.convnext.conv1.weight`.
    pub path: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// The float parameters of `module`, in visit order.
pub fn describe<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut v = Describe::default();
    module.visit(&mut v);
    v.out
}

/// The path of the first float parameter of `module` holding a NaN or an
/// infinity, if any.
pub fn first_non_finite<B: Backend, M: Module<B>>(module: &M) -> Option<String> {
    let mut v = Describe {
        check_values: true,
        ..Describe::default()
    };
    module.visit(&mut v);
    v.first_non_finite
}

/// The first difference between the parameters a module should have
/// (`expected`) and those it has (`found`), as a sentence.
pub fn mismatch(expected: &[ParamInfo], found: &[ParamInfo]) -> Option<String> {
    for (e, f) in expected.iter().zip(found) {
        if e.path != f.path {
            return Some(format!("parameter {} where {} was expected", f.path, e.path));
        }
        if e.shape != f.shape {
            return Some(format!(
                "{} has shape {:?}, the configuration needs {:?}",
                e.path, f.shape, e.shape
            ));
        }
    }
    if expected.len() != found.len() {
        return Some(format!(
            "{} parameters, the configuration needs {}",
            found.len(),
            expected.len()
        ));
    }
    None
}

#[derive(Default)]
struct Describe {
    /// The path of the module being visited.
    stack: Vec<String>,
    out: Vec<ParamInfo>,
    /// Whether to read the values back (one number per parameter).
    check_values: bool,
    first_non_finite: Option<String>,
}

impl<B: Backend> ModuleVisitor<B> for Describe {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.stack.join(".");
        if self.check_values && self.first_non_finite.is_none() {
            // Σ|w| is NaN or infinite exactly when some value is (weights
            // near f32::MAX aside, which are broken anyway).
            let s: f64 = param.val().abs().sum().into_scalar().elem();
            if !s.is_finite() {
                self.first_non_finite = Some(path.clone());
            }
        }
        self.out.push(ParamInfo {
            path,
            shape: param.val().dims().to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
    }

    #[test]
    fn paths_shapes_and_non_finite_values() {
        let device = Default::default();
        let m = Two::<Flex> {
            a: LinearConfig::new(3, 2).init(&device),
            b: LinearConfig::new(2, 4).init(&device),
        };
        let d = describe(&m);
        let paths: Vec<&str> = d.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["a.weight", "a.bias", "b.weight", "b.bias"]);
        assert_eq!(d[2].shape, [2, 4]);
        assert_eq!(first_non_finite(&m), None);
        let other = Two::<Flex> {
            a: LinearConfig::new(3, 2).init(&device),
            b: LinearConfig::new(2, 5).init(&device),
        };
        let msg = mismatch(&d, &describe(&other)).unwrap();
        assert_eq!(msg, "b.weight has shape [2, 5], the configuration needs [2, 4]");
        let nan = Two {
            b: Linear {
                weight: Param::from_tensor(Tensor::full([2, 4], f32::NAN, &device)),
                bias: None,
            },
            ..m
        };
        assert_eq!(first_non_finite(&nan).as_deref(), Some("b.weight"));
    }
}

std::thread_local! {
    /// Set while this thread runs a [`decode_guarded`] decoder.
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a decoder of file contents, turning a panic inside it into an
/// error carrying the panic's message. burn 0.21's record decoding panics
/// on some malformed files (found by fuzzing: `ParamId::deserialize` says
/// "Invalid id." on a mutated .mpk) instead of returning an error; the
/// panic hook stays quiet for this thread meanwhile, so the caller reports
/// one error, not a crash report.
///
/// The hook is wrapped once, and the wrapper asks a thread-local flag:
/// swapping the process-wide hook around each call instead raced between
/// threads (fuzzing with two threads printed decoder panics, and could
/// have left the silent hook installed for good).
pub fn decode_guarded<T>(decode: impl FnOnce() -> T) -> Result<T, String> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = DECODING.with(|d| d.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    DECODING.with(|d| d.set(was));
    result.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder failed")
            .to_string()
    })
}
