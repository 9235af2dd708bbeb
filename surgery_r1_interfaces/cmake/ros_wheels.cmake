# ROS 2 from the PyPI wheels (ros-rclpy, ros-ament-cmake, ...) instead of a sourced ROS 2 install.
#
# The ros-* wheels install a ROS prefix (share/<pkg>/cmake, lib, include) into the Python environment's
# prefix: the folder four levels above ament_package/__init__.py (<prefix>/lib/pythonX.Y/site-packages).
# A sourced ROS 2 install (apt, source build, RoboStack) lists its prefix in AMENT_PREFIX_PATH; then this
# file changes nothing. Otherwise (colcon or `pip install` beside the wheels) it adds the wheels' prefix to
# CMAKE_PREFIX_PATH and AMENT_PREFIX_PATH and sets SURGERY_R1_ROS_WHEELS, for surgery_r1_fix_wheel_targets().

function(surgery_r1_find_ros_wheels)
  set(SURGERY_R1_ROS_WHEELS FALSE PARENT_SCOPE)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import ament_package, pathlib; print(pathlib.Path(ament_package.__file__).resolve().parents[4].as_posix())"
    OUTPUT_VARIABLE _prefix
    OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET
    RESULT_VARIABLE _result
  )
  if(NOT _result EQUAL 0 OR NOT EXISTS "${_prefix}/share/ament_cmake")
    if(SKBUILD)
      message(FATAL_ERROR
        "The ROS 2 build wheels were not found by ${Python3_EXECUTABLE} (prefix '${_prefix}'). "
        "Install the build requirements first: pip install -r requirements/ros.txt")
    endif()
    return()  # no wheels: a sourced ROS 2 install provides everything
  endif()
  set(_ament_prefixes "$ENV{AMENT_PREFIX_PATH}")
  string(REPLACE ":" ";" _ament_prefixes "${_ament_prefixes}")
  foreach(_listed IN LISTS _ament_prefixes)
    if(_listed AND EXISTS "${_listed}")
      file(REAL_PATH "${_listed}" _listed)
      if(_listed STREQUAL _prefix)
        return()  # ament_package comes from a sourced ROS 2 install
      endif()
    endif()
  endforeach()
  message(STATUS "ROS 2 wheels prefix: ${_prefix}")
  list(PREPEND CMAKE_PREFIX_PATH "${_prefix}")
  set(CMAKE_PREFIX_PATH "${CMAKE_PREFIX_PATH}" PARENT_SCOPE)
  # rosidl looks its type support packages up in the ament index ("No 'rosidl_typesupport_c' found" without it)
  if("$ENV{AMENT_PREFIX_PATH}" STREQUAL "")
    set(ENV{AMENT_PREFIX_PATH} "${_prefix}")
  else()
    set(ENV{AMENT_PREFIX_PATH} "$ENV{AMENT_PREFIX_PATH}:${_prefix}")
  endif()
  set(SURGERY_R1_ROS_WHEELS TRUE PARENT_SCOPE)
endfunction()

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
