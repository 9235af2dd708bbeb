# Only for the pip build (scikit-build-core) against the ROS 2 wheels from PyPI; colcon never includes it.
#
# The ros-* wheels install a ROS prefix (share/<pkg>/cmake, lib, include) into the Python environment's
# prefix: the folder four levels above ament_package/__init__.py (<prefix>/lib/pythonX.Y/site-packages).

find_package(Python3 REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
    "import ament_package, pathlib; print(pathlib.Path(ament_package.__file__).resolve().parents[4].as_posix())"
  OUTPUT_VARIABLE ROS_WHEELS_PREFIX
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _ros_wheels_result
)
if(NOT _ros_wheels_result EQUAL 0 OR NOT EXISTS "${ROS_WHEELS_PREFIX}/share/ament_cmake")
  message(FATAL_ERROR
    "The ROS 2 build wheels were not found by ${Python3_EXECUTABLE} (prefix '${ROS_WHEELS_PREFIX}'). "
    "Install the build requirements first: pip install -r requirements/ros.txt")
endif()
message(STATUS "ROS 2 wheels prefix: ${ROS_WHEELS_PREFIX}")
list(PREPEND CMAKE_PREFIX_PATH "${ROS_WHEELS_PREFIX}")
# rosidl looks its type support packages up in the ament index ("No 'rosidl_typesupport_c' found" without it).
if("$ENV{AMENT_PREFIX_PATH}" STREQUAL "")
  set(ENV{AMENT_PREFIX_PATH} "${ROS_WHEELS_PREFIX}")
endif()

# The wheels' exported <pkg>__rosidl_generator_py targets carry the include folders of the machine that
# built the wheels (/opt/python/...). CMake rejects imported targets with missing include folders, so keep
# only the folders that exist here. Call it after the last find_package.
function(surgery_r1_fix_wheel_targets)
  get_property(_targets DIRECTORY PROPERTY IMPORTED_TARGETS)
  foreach(_target IN LISTS _targets)
    get_target_property(_dirs "${_target}" INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs)
      continue()
    endif()
    set(_kept "")
    foreach(_dir IN LISTS _dirs)
      if(EXISTS "${_dir}" OR _dir MATCHES "^\\$<")
        list(APPEND _kept "${_dir}")
      endif()
    endforeach()
    if(NOT _kept STREQUAL _dirs)
      set_target_properties("${_target}" PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_kept}")
    endif()
  endforeach()
endfunction()
